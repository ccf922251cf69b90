//! Preemption: room for a job's instances that fit nowhere as things are, made by
//! evicting live allocations of jobs of clearly lower priority. Pure like the
//! planner: the same snapshot, request and priority always give the same answer.
//!
//! Instances are placed one at a time, in request order, each seeing the evictions
//! and placements before it. One that fits somewhere as things stand goes where
//! [`crate::planner::plan`] would put it. Otherwise every node passing the group's
//! status and constraint checks is asked for the least disruptive victims that
//! make room there:
//!
//! 1. **Who may go.** Live allocations of other jobs whose priority is at least
//!    [`PREEMPTION_MARGIN`] below the requester's, so jobs of nearly equal priority
//!    never take turns evicting each other.
//! 2. **The lowest priorities that suffice.** Whole priority levels are added,
//!    lowest first, until the instance fits; no higher level is touched.
//! 3. **Nothing superfluous.** Each candidate is then given back, smallest first
//!    (by its share of the node), higher priorities first among equals, while the
//!    instance still fits without it. What is left is needed, every one of it.
//!
//! The node whose victims have the lowest highest priority wins, then the one
//! with the fewest victims, then the one freeing least, then the earliest node id.
//! A gang is placed whole, with its evictions, or neither happens.

use aigrid_api::{AllocId, JobId, NodeId};

use crate::planner::{
    place_one_by_one, Draft, GroupPlanner, LiveAlloc, Placement, PlanRequest, PlanSnapshot,
    UnplacedGroup,
};

/// How many priority points a job must be above another to evict it.
pub const PREEMPTION_MARGIN: u32 = 10;

/// What preemption would do: stop the evicted allocations and commit the
/// placements, in one change. It answers for the whole request, as a
/// [`crate::planner::Plan`] does, and replaces the plan's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Preemption {
    /// Instances placed, in placement order; those that needed room are on what
    /// the evictions free.
    pub placements: Vec<Placement>,
    /// Live allocations to stop, in eviction order.
    pub evictions: Vec<Eviction>,
    /// Groups with instances left unplaced even so, and why as things are after
    /// the evictions.
    pub unplaced: Vec<UnplacedGroup>,
}

/// A live allocation preemption stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The allocation.
    pub alloc_id: AllocId,
    /// Its job, which loses an instance and wants planning again.
    pub job_id: JobId,
    /// Its task group.
    pub group: String,
    /// Its index within the group.
    pub index: u32,
    /// The node it frees room on.
    pub node_id: NodeId,
    /// Its job's priority.
    pub priority: u32,
}

/// Places `request` for a job of `priority` on `snapshot`, evicting lower
/// priority allocations where an instance fits nowhere as things are. See the
/// module documentation for the rules. `None` when evicting places nothing that
/// [`crate::planner::plan`] could not place as well.
pub fn plan_preemption(
    snapshot: &PlanSnapshot,
    request: &PlanRequest,
    priority: u32,
) -> Option<Preemption> {
    plan_eviction(snapshot, request, &|a: &LiveAlloc| {
        a.info.priority.saturating_add(PREEMPTION_MARGIN) <= priority
    })
}

/// As [`plan_preemption`], with the allocations that may be evicted chosen by
/// `may_evict` instead of by priority (never the requesting job's own): what
/// quotas' reclaim and priority preemption under quotas use. Victims are still
/// chosen lowest priority first, as few and as small as make room.
pub fn plan_eviction(
    snapshot: &PlanSnapshot,
    request: &PlanRequest,
    may_evict: &dyn Fn(&LiveAlloc) -> bool,
) -> Option<Preemption> {
    let mut progress = Progress {
        draft: Draft::new(snapshot),
        out: Preemption::default(),
    };
    let unplaced = place_one_by_one(
        snapshot,
        request,
        &mut progress,
        |progress, group, index| place(progress, group, &request.job_id, index, may_evict),
    );
    let mut out = progress.out;
    out.unplaced = unplaced;
    (!out.evictions.is_empty()).then_some(out)
}

/// Where one call stands: what is taken, and what it will answer.
#[derive(Clone)]
struct Progress<'s> {
    draft: Draft<'s>,
    out: Preemption,
}

impl<'s> AsRef<Draft<'s>> for Progress<'s> {
    fn as_ref(&self) -> &Draft<'s> {
        &self.draft
    }
}

/// Places one instance, evicting if it must. False when it fits nowhere even so.
fn place(
    progress: &mut Progress<'_>,
    group: &GroupPlanner<'_>,
    job_id: &JobId,
    index: u32,
    may_evict: &dyn Fn(&LiveAlloc) -> bool,
) -> bool {
    let Progress { draft, out } = progress;
    if let Some((n, gpus)) = draft.best(group, job_id, None) {
        out.placements
            .push(draft.place(group, job_id, index, n, &gpus));
        return true;
    }
    let Some((n, victims)) = least_disruptive(draft, group, job_id, may_evict) else {
        return false;
    };
    let Some(gpus) = draft.fits_without(group, n, &victims) else {
        debug_assert!(false, "the victims were chosen to make room");
        return false;
    };
    let node_id = draft.snapshot().node_id(n).clone();
    for victim in victims {
        draft.let_go(n, victim);
        out.evictions.push(Eviction {
            alloc_id: victim.id.clone(),
            job_id: victim.job_id.clone(),
            group: victim.group.clone(),
            index: victim.index,
            node_id: node_id.clone(),
            priority: victim.info.priority,
        });
    }
    out.placements
        .push(draft.place(group, job_id, index, n, &gpus));
    true
}

/// Ranks a node's victims: highest priority among them, how many, share freed,
/// node position. Lower is less disruptive.
type Disruption = (u32, usize, u64, usize);

/// The node where making room for one instance disrupts least, and its victims
/// sorted by id.
fn least_disruptive<'s>(
    draft: &Draft<'s>,
    group: &GroupPlanner<'_>,
    job_id: &JobId,
    may_evict: &dyn Fn(&LiveAlloc) -> bool,
) -> Option<(usize, Vec<&'s LiveAlloc>)> {
    let snapshot = draft.snapshot();
    let mut best: Option<(Disruption, Vec<&'s LiveAlloc>)> = None;
    for n in group.candidates() {
        let mut evictable: Vec<&'s LiveAlloc> = draft
            .live_on(n)
            .filter(|a| &a.job_id != job_id && may_evict(a))
            .collect();
        let Some(lowest) = evictable.iter().map(|a| a.info.priority).min() else {
            continue;
        };
        // The best this node could do: victims of its lowest priority, only as many
        // as the GPUs it lacks need with the largest going first, freeing no more
        // than its smallest allocations. Most nodes of a busy cluster lose to the
        // best so far on that alone.
        let most = evictable.iter().map(|a| a.gpu_count()).max().unwrap_or(0);
        let fewest = match (draft.gpus_missing(group, n), most) {
            (0, _) => 1,
            (_, 0) => continue,
            (missing, most) => missing.div_ceil(most),
        };
        let mut shares: Vec<u64> = evictable.iter().map(|a| snapshot.share(n, a)).collect();
        shares.sort_unstable();
        let bound = (lowest, fewest, shares.iter().take(fewest).sum(), n);
        if best.as_ref().is_some_and(|(top, _)| bound > *top) {
            continue;
        }
        if draft.fits_without(group, n, &evictable).is_none() {
            continue;
        }
        // Whole priority levels, lowest first, until the instance fits. Sorting is
        // stable and the node's allocations come by id, so ties stay in id order.
        evictable.sort_by_key(|a| a.info.priority);
        let mut end = 0;
        while end < evictable.len() {
            let level = evictable[end].info.priority;
            end = evictable.partition_point(|a| a.info.priority <= level);
            if draft.fits_without(group, n, &evictable[..end]).is_some() {
                break;
            }
        }
        evictable.truncate(end);
        let Some(mut victims) = draft.make_room(group, n, evictable) else {
            continue;
        };
        victims.sort_by(|a, b| a.id.cmp(&b.id));
        let disruption = (
            victims.iter().map(|a| a.info.priority).max().unwrap_or(0),
            victims.len(),
            victims.iter().map(|a| snapshot.share(n, a)).sum(),
            n,
        );
        if best.as_ref().is_none_or(|(top, _)| disruption < *top) {
            best = Some((disruption, victims));
        }
    }
    best.map(|((.., n), victims)| (n, victims))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use aigrid_api::{Allocation, ConstraintOp, GpuRequest, MemoryMib, Node, Resources};
    use proptest::prelude::*;

    use super::*;
    use crate::planner::testkit::*;
    use crate::planner::{plan, GroupInfo, Plan};

    /// A snapshot where job `name`'s priority is the number after its last `-`
    /// (`batch-10`), and every group is movable.
    fn snapshot(nodes: &[Node], allocs: &[Allocation]) -> PlanSnapshot {
        PlanSnapshot::with_jobs(nodes, allocs, |job, _| {
            let priority = job.as_str().rsplit('-').next()?.parse().ok()?;
            Some(GroupInfo {
                priority,
                movable: true,
                listens: false,
            })
        })
    }

    /// Node `id` with eight H100s, each held by its own one-GPU allocation of
    /// `job`.
    fn full(id: &str, job: &str) -> (Node, Vec<Allocation>) {
        let allocs = (0..8)
            .map(|i| {
                let gpu = format!("{id}-gpu{i}");
                holding(&format!("{id}-{i}"), job, id, ("g", i), &[&gpu])
            })
            .collect();
        (node(id, &[], 64000, 65536, &h100s(8)), allocs)
    }

    fn evicted(p: &Preemption) -> Vec<&str> {
        p.evictions.iter().map(|e| e.alloc_id.as_str()).collect()
    }

    fn one(gpus_wanted: u32) -> PlanRequest {
        request(vec![group(
            "new",
            1,
            1000,
            1024,
            gpus(gpus_wanted, None, None),
        )])
    }

    #[test]
    fn evicts_only_the_lowest_priority_allocations_that_suffice() {
        let (a, mut allocs) = full("a", "batch-10");
        let (b, more) = full("b", "batch-30");
        allocs.extend(more);
        let nodes = [a, b];
        let snap = snapshot(&nodes, &allocs);
        assert!(plan(&snap, &one(4)).placements.is_empty());
        let p = plan_preemption(&snap, &one(4), 50).unwrap();
        assert_eq!(evicted(&p), ["a-0", "a-1", "a-2", "a-3"]);
        assert!(p.evictions.iter().all(|e| e.priority == 10));
        assert_eq!(nodes_of(&p.placements), ["a"]);
        assert!(p.unplaced.is_empty());
        // Within the margin of both: nothing to evict.
        assert_eq!(plan_preemption(&snap, &one(4), 15), None);
        // Where node a is ruled out, the prio-30 work goes.
        let mut req = one(4);
        req.groups[0].group.constraints = vec![rule("id", ConstraintOp::Ne, &["a"])];
        let mut nodes = nodes;
        nodes[0].attributes.insert("id".to_owned(), "a".to_owned());
        let p = plan_preemption(&snapshot(&nodes, &allocs), &req, 50).unwrap();
        assert_eq!(evicted(&p), ["b-0", "b-1", "b-2", "b-3"]);
    }

    #[test]
    fn evicts_the_fewest_and_only_what_frees_what_the_instance_lacks() {
        let nodes = [node("a", &[], 64000, 65536, &h100s(8))];
        let mut allocs = vec![holding(
            "big",
            "train-10",
            "a",
            ("g", 0),
            &["a-gpu0", "a-gpu1", "a-gpu2", "a-gpu3"],
        )];
        for i in 4..8 {
            let gpu = format!("a-gpu{i}");
            allocs.push(holding(
                &format!("small{i}"),
                "batch-10",
                "a",
                ("g", i),
                &[&gpu],
            ));
        }
        // CPU-only work of the lowest priority frees no GPU: never a victim.
        allocs.push(holding("cpu", "web-0", "a", ("g", 0), &[]));
        let p = plan_preemption(&snapshot(&nodes, &allocs), &one(4), 50).unwrap();
        assert_eq!(evicted(&p), ["big"]);
        assert_eq!(
            p.placements[0].gpus,
            ["a-gpu0", "a-gpu1", "a-gpu2", "a-gpu3"]
        );
        // Two GPUs: still the one big victim, fewer than two small ones.
        let p = plan_preemption(&snapshot(&nodes, &allocs), &one(2), 50).unwrap();
        assert_eq!(evicted(&p), ["big"]);
    }

    #[test]
    fn among_equally_few_victims_the_node_freeing_least_wins() {
        let nodes = [
            node("a", &[], 64000, 65536, &h100s(4)),
            node("b", &[], 64000, 65536, &h100s(4)),
        ];
        let allocs = [
            holding(
                "four",
                "batch-10",
                "a",
                ("g", 0),
                &["a-gpu0", "a-gpu1", "a-gpu2", "a-gpu3"],
            ),
            holding("two", "batch-10", "b", ("g", 1), &["b-gpu0", "b-gpu1"]),
            holding("keep", "serve-90", "b", ("s", 0), &["b-gpu2", "b-gpu3"]),
        ];
        let p = plan_preemption(&snapshot(&nodes, &allocs), &one(2), 50).unwrap();
        assert_eq!(evicted(&p), ["two"]);
    }

    #[test]
    fn victims_hold_gpus_that_suit_the_request() {
        let mut gs = h100s(4);
        gs.extend(vec![("NVIDIA A100", 40, true, None); 4]);
        let nodes = [node("a", &[], 64000, 65536, &gs)];
        let mut allocs = Vec::new();
        for i in 0..8 {
            let job = if i < 4 { "h100-20" } else { "a100-0" };
            let gpu = format!("a-gpu{i}");
            allocs.push(holding(&format!("x{i}"), job, "a", ("g", i), &[&gpu]));
        }
        let req = request(vec![group(
            "new",
            1,
            1000,
            1024,
            gpus(2, Some("H100"), None),
        )]);
        let p = plan_preemption(&snapshot(&nodes, &allocs), &req, 50).unwrap();
        assert_eq!(evicted(&p), ["x0", "x1"]);
    }

    #[test]
    fn never_evicts_its_own_job_or_a_job_within_the_margin() {
        let (a, own) = full("a", "job");
        let (b, close) = full("b", "other-41");
        let allocs: Vec<Allocation> = own.into_iter().chain(close).collect();
        assert_eq!(
            plan_preemption(&snapshot(&[a, b], &allocs), &one(1), 50),
            None
        );
    }

    #[test]
    fn later_instances_see_earlier_evictions_and_slices_go_too() {
        let (a, allocs) = full("a", "batch-0");
        let req = request(vec![group("new", 2, 1000, 1024, gpus(4, None, None))]);
        let p = plan_preemption(&snapshot(&[a], &allocs), &req, 50).unwrap();
        assert_eq!(evicted(&p).len(), 8);
        let unique: BTreeSet<&str> = evicted(&p).into_iter().collect();
        assert_eq!(unique.len(), 8);
        assert_eq!(p.placements.len(), 2);

        let l4 = [node("s", &[], 64000, 65536, &[("L4", 24, true, None)])];
        let mut slice = Resources {
            cpu_millis: 1000.into(),
            memory_mib: 1024.into(),
            gpus: Some(GpuRequest {
                count: 1,
                model: None,
                min_memory_mib: None,
                memory_slice_mib: Some(MemoryMib::new(10240)),
                same_interconnect: false,
            }),
        };
        let sliced = vec![
            live("s1", "infer-10", "s", slice.clone(), &["s-gpu0"]),
            live("s2", "infer-10", "s", slice.clone(), &["s-gpu0"]),
        ];
        let p = plan_preemption(&snapshot(&l4, &sliced), &one(1), 50).unwrap();
        assert_eq!(evicted(&p), ["s1", "s2"]);
        // A slice needs room for itself only: one of the two goes.
        slice.gpus.as_mut().unwrap().memory_slice_mib = Some(MemoryMib::new(6144));
        let mut g = group("new", 1, 1000, 1024, None);
        g.resources = slice;
        let p = plan_preemption(&snapshot(&l4, &sliced), &request(vec![g]), 50).unwrap();
        assert_eq!(evicted(&p), ["s1"]);
    }

    #[test]
    fn a_gang_evicts_for_all_its_instances_or_for_none() {
        let (a, mut allocs) = full("a", "batch-10");
        let (b, more) = full("b", "batch-20");
        let (c, most) = full("c", "serve-90");
        allocs.extend(more);
        allocs.extend(most);
        let nodes = [a, b, c];
        let mut g = group("train", 3, 1000, 1024, gpus(8, None, None));
        g.gang = true;
        let snap = snapshot(&nodes, &allocs);
        assert_eq!(plan_preemption(&snap, &request(vec![g.clone()]), 50), None);
        g.count = 2;
        let p = plan_preemption(&snap, &request(vec![g]), 50).unwrap();
        assert_eq!(p.evictions.len(), 16);
        assert_eq!(nodes_of(&p.placements), ["a", "b"]);
    }

    #[test]
    fn a_gang_that_cannot_fit_is_explained_and_keeps_no_evictions() {
        let (a, allocs) = full("a", "batch-10");
        let mut g = group("train", 2, 1000, 1024, gpus(8, None, None));
        g.gang = true;
        let plain = group("plain", 1, 1000, 1024, gpus(2, None, None));
        let p = plan_preemption(&snapshot(&[a], &allocs), &request(vec![g, plain]), 50).unwrap();
        assert_eq!(p.unplaced.len(), 1);
        let gang = &p.unplaced[0];
        assert_eq!((gang.missing, gang.gang_fitted), (2, Some(1)));
        assert_eq!(evicted(&p).len(), 2);
        assert_eq!(p.placements[0].group, "plain");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn preemption_never_overcommits_spares_close_priorities_and_is_deterministic(
            (nodes, earlier, groups, priority) in arb_crowded()
        ) {
            let allocs = populate(&nodes, &earlier);
            let info = |job: &JobId, _: &str| Earlier::info(&earlier, job);
            let snap = PlanSnapshot::with_jobs(&nodes, &allocs, info);
            let req = request(groups);
            let out = plan_preemption(&snap, &req, priority);
            let reversed: Vec<Node> = nodes.iter().rev().cloned().collect();
            let shuffled: Vec<Allocation> = allocs.iter().rev().cloned().collect();
            let again = PlanSnapshot::with_jobs(&reversed, &shuffled, info);
            prop_assert_eq!(&out, &plan_preemption(&again, &req, priority));
            let Some(p) = out else { return Ok(()) };
            let mut seen = HashSet::new();
            for e in &p.evictions {
                prop_assert!(seen.insert(&e.alloc_id), "{} evicted twice", e.alloc_id);
                let victim = allocs.iter().find(|a| a.id == e.alloc_id).unwrap();
                prop_assert!(victim.job_id != req.job_id);
                let job = earlier.iter().find(|j| j.job_id == victim.job_id).unwrap();
                prop_assert_eq!(job.priority, e.priority);
                prop_assert!(e.priority + PREEMPTION_MARGIN <= priority);
            }
            // What is left plus what is placed fits, and the placements obey their group.
            let placements = Plan { placements: p.placements.clone(), unplaced: Vec::new() };
            check_plan(&nodes, &after(&allocs, &seen, []), &req, &placements);
        }

        #[test]
        fn every_victim_is_needed((nodes, earlier, groups, priority) in arb_crowded()) {
            // One instance, so each victim was chosen for it alone.
            let mut g = groups[0].clone();
            g.count = 1;
            g.gang = false;
            let allocs = populate(&nodes, &earlier);
            let info = |job: &JobId, _: &str| Earlier::info(&earlier, job);
            let req = request(vec![g]);
            let Some(p) = plan_preemption(&PlanSnapshot::with_jobs(&nodes, &allocs, info), &req, priority) else {
                return Ok(());
            };
            let target = &p.placements[0].node_id;
            let only: Vec<Node> = nodes.iter().filter(|n| &n.id == target).cloned().collect();
            for spared in &p.evictions {
                let stopped: HashSet<&AllocId> = p
                    .evictions
                    .iter()
                    .map(|e| &e.alloc_id)
                    .filter(|id| *id != &spared.alloc_id)
                    .collect();
                let rest = after(&allocs, &stopped, []);
                let replanned = plan(&PlanSnapshot::new(&only, &rest), &req);
                prop_assert!(replanned.placements.is_empty(), "{} was superfluous", spared.alloc_id);
            }
        }
    }
}
