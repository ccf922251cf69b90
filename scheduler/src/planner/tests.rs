//! The planner's unit and property tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aigrid_api::{
    Affinity, AllocId, Allocation, Constraint, ConstraintOp, ConstraintValue, DesiredState, JobId,
    JobSpec, MemoryMib, Node, NodeId, NodeStatus, Resources, Spread, TaskGroup,
};
use proptest::prelude::*;

use super::testkit::*;
use super::*;

#[test]
fn only_ready_nodes_take_work() {
    let mut down = node("a", &[], 4000, 4096, &[]);
    down.status = NodeStatus::Down;
    let mut draining = node("b", &[], 4000, 4096, &[]);
    draining.status = NodeStatus::Draining;
    let nodes = [down, draining, node("c", &[], 4000, 4096, &[])];
    let p = run(&nodes, vec![group("g", 2, 1000, 1024, None)]);
    assert_eq!(on(&p), ["c", "c"]);
}

#[test]
fn every_constraint_op_filters() {
    let nodes = [
        node(
            "a",
            &[("country", "BE"), ("cuda", "12.4"), ("site", "ghent-1")],
            8000,
            8192,
            &[],
        ),
        node(
            "b",
            &[("country", "NL"), ("cuda", "11.8"), ("site", "delft")],
            8000,
            8192,
            &[],
        ),
        node("c", &[("country", "FR")], 8000, 8192, &[]),
    ];
    let cases: [(Constraint, &[&str]); 7] = [
        (rule("country", ConstraintOp::Eq, &["NL"]), &["b"]),
        (rule("country", ConstraintOp::Ne, &["NL"]), &["a", "c"]),
        (
            rule("country", ConstraintOp::In, &["BE", "NL"]),
            &["a", "b"],
        ),
        (rule("country", ConstraintOp::NotIn, &["BE"]), &["b", "c"]),
        (rule("site", ConstraintOp::Regex, &["^ghent"]), &["a"]),
        (rule("cuda", ConstraintOp::Ge, &["12"]), &["a"]),
        (rule("cuda", ConstraintOp::Le, &["12"]), &["b"]),
    ];
    for (constraint, expected) in cases {
        let mut g = group("g", 3, 1000, 1024, None);
        g.constraints = vec![constraint.clone()];
        g.spread = vec![Spread {
            attribute: "country".to_owned(),
            weight: None,
        }];
        let p = run(&nodes, vec![g]);
        let used: BTreeSet<&str> = on(&p).into_iter().collect();
        assert_eq!(
            used.into_iter().collect::<Vec<_>>(),
            expected,
            "{constraint:?}"
        );
    }
}

#[test]
fn listening_instances_need_a_free_port_and_stopping_ones_keep_theirs() {
    let mut small = node("a", &[], 16_000, 65_536, &[]);
    small.ports = aigrid_api::PortRange {
        first: 30_000,
        last: 30_001,
    };
    let big = node("b", &[], 16_000, 65_536, &[]);
    let mut served = group("llm", 3, 1000, 1024, None);
    served.task = aigrid_api::TaskSpec::ModelServer(aigrid_api::ModelServerTask {
        model: "d".into(),
        auto_truncate: false,
    });
    // Bin-packing would put all three on `a`; its two ports take two.
    let placed = run(&[small.clone(), big], vec![served.clone()]);
    assert_eq!(on(&placed), ["a", "a", "b"]);
    // An exec group listens on nothing and is not limited by ports.
    let placed = run(&[small.clone()], vec![group("web", 3, 1000, 1024, None)]);
    assert_eq!(on(&placed), ["a", "a", "a"]);

    // One port held by an allocation asked to stop (not yet gone), one free.
    let mut stopping = live("s", "old", "a", served.resources.clone(), &[]);
    stopping.port = Some(30_000);
    stopping.desired = DesiredState::Stop;
    let snapshot = PlanSnapshot::new([&small], [&stopping]);
    let planned = plan(&snapshot, &request(vec![served]));
    assert_eq!(on(&planned), ["a"]);
    let why = planned.unplaced[0].explanation.to_string();
    assert!(why.contains("1 had no free port"), "{why}");
}

#[test]
fn cpu_and_memory_must_fit_and_binpacking_fills_the_fuller_node() {
    let nodes = [
        node("a", &[], 4000, 8192, &[]),
        node("b", &[], 4000, 8192, &[]),
        node("c", &[], 500, 8192, &[]),
    ];
    let snapshot = PlanSnapshot::new(
        &nodes,
        &[live(
            "x",
            "other",
            "b",
            Resources {
                cpu_millis: 2000.into(),
                memory_mib: 4096.into(),
                gpus: None,
            },
            &[],
        )],
    );
    let p = plan(&snapshot, &request(vec![group("g", 3, 1000, 2048, None)]));
    // b is fuller, so it fills first; then a. c never has the CPU.
    assert_eq!(on(&p), ["b", "b", "a"]);
    let p = plan(&snapshot, &request(vec![group("g", 7, 1000, 2048, None)]));
    assert_eq!(p.placements.len(), 6);
    assert_eq!(p.unplaced[0].missing, 1);
    assert_eq!(
        p.unplaced[0].to_unplaced().reason,
        "0/3 nodes: 3 lacked 1000 free CPU millis"
    );
}

#[test]
fn gpus_match_model_memory_and_prefer_the_tightest_node() {
    let nodes = [
        node("a", &[], 64000, 65536, &h100s(8)),
        node("b", &[], 64000, 65536, &h100s(2)),
        node(
            "c",
            &[],
            64000,
            65536,
            &[("NVIDIA A100", 40, true, None); 4],
        ),
    ];
    let p = run(
        &nodes,
        vec![group("g", 1, 1000, 1024, gpus(2, Some("H100"), Some(40)))],
    );
    assert_eq!(on(&p), ["b"]);
    assert_eq!(p.placements[0].gpus, ["b-gpu0", "b-gpu1"]);
    let p = run(
        &nodes,
        vec![group("g", 1, 1000, 1024, gpus(4, None, Some(60)))],
    );
    assert_eq!(on(&p), ["a"]);
    let p = run(
        &nodes,
        vec![group("g", 2, 1000, 1024, gpus(3, Some("A100"), None))],
    );
    assert_eq!(on(&p), ["c"]);
    assert_eq!(
        p.unplaced[0].to_unplaced().reason,
        "0/3 nodes: 3 lacked 3 free A100"
    );
}

#[test]
fn unhealthy_and_held_gpus_are_never_chosen() {
    let mut gs = h100s(4);
    gs[0].2 = false;
    gs[2].2 = false;
    let nodes = [node("a", &[], 64000, 65536, &gs)];
    let held = live(
        "x",
        "other",
        "a",
        Resources {
            cpu_millis: 1000.into(),
            memory_mib: 1024.into(),
            gpus: gpus(1, None, None),
        },
        &["a-gpu1"],
    );
    let snapshot = PlanSnapshot::new(&nodes, &[held]);
    let p = plan(
        &snapshot,
        &request(vec![group("g", 4, 1000, 1024, gpus(1, None, None))]),
    );
    let chosen: Vec<&str> = p
        .placements
        .iter()
        .flat_map(|p| &p.gpus)
        .map(String::as_str)
        .collect();
    assert_eq!(chosen, ["a-gpu3"]);
    assert_eq!(p.unplaced[0].missing, 3);
}

#[test]
fn slices_share_a_gpu_only_while_memory_fits() {
    let nodes = [node(
        "a",
        &[],
        64000,
        65536,
        &[("L4", 24, true, None), ("L4", 24, true, None)],
    )];
    let mut request_gpu = gpus(1, Some("L4"), None).unwrap();
    request_gpu.memory_slice_mib = Some(MemoryMib::new(10 * 1024));
    let p = run(
        &nodes,
        vec![group("s", 5, 1000, 1024, Some(request_gpu.clone()))],
    );
    // Two 10 GiB slices per 24 GiB GPU; the fifth fits nowhere.
    assert_eq!(p.placements.len(), 4);
    let first: Vec<&str> = p.placements.iter().map(|p| p.gpus[0].as_str()).collect();
    assert_eq!(first, ["a-gpu0", "a-gpu0", "a-gpu1", "a-gpu1"]);
    assert!(p
        .placements
        .iter()
        .all(|p| p.gpu_memory_slice == Some(MemoryMib::new(10240))));
    // A whole-GPU request cannot take a GPU that holds slices.
    let whole = group("w", 1, 1000, 1024, gpus(1, None, None));
    let p = run(
        &nodes,
        vec![group("s", 1, 1000, 1024, Some(request_gpu)), whole],
    );
    assert_eq!(p.placements[1].gpus, ["a-gpu1"]);
}

#[test]
fn spread_over_three_sites_puts_three_replicas_on_three_sites() {
    let nodes: Vec<Node> = (0..9)
        .map(|i| {
            let site = ["ghent", "delft", "lille"][i % 3];
            node(&format!("n{i}"), &[("site", site)], 16000, 65536, &h100s(8))
        })
        .collect();
    let mut g = group("replica", 3, 1000, 1024, gpus(1, Some("H100"), Some(40)));
    g.spread = vec![Spread {
        attribute: "site".to_owned(),
        weight: None,
    }];
    let p = run(&nodes, vec![g.clone()]);
    let sites: BTreeSet<&str> = p
        .placements
        .iter()
        .map(|p| {
            let n = nodes.iter().find(|n| n.id == p.node_id).unwrap();
            n.attributes["site"].as_str()
        })
        .collect();
    assert_eq!(sites.len(), 3);
    // Without spread, bin-packing keeps them together.
    g.spread.clear();
    let p = run(&nodes, vec![g]);
    assert_eq!(on(&p), ["n0", "n0", "n0"]);
}

#[test]
fn affinities_attract_and_repel() {
    let nodes = [
        node("a", &[("site", "x")], 8000, 8192, &[]),
        node("b", &[("site", "y")], 8000, 8192, &[]),
    ];
    let mut g = group("g", 1, 1000, 1024, None);
    g.affinities = vec![Affinity {
        attribute: "site".to_owned(),
        op: ConstraintOp::Eq,
        value: ConstraintValue::One("y".to_owned()),
        weight: 50,
    }];
    assert_eq!(on(&run(&nodes, vec![g.clone()])), ["b"]);
    g.affinities[0].weight = -50;
    g.affinities[0].value = ConstraintValue::One("x".to_owned());
    assert_eq!(on(&run(&nodes, vec![g])), ["b"]);
}

#[test]
fn multi_gpu_instance_picks_gpus_of_one_interconnect_group() {
    let gs: Vec<Gpu> = (0..8)
        .map(|i| {
            (
                "H100",
                80,
                true,
                Some(["nvl-a", "nvl-b", "nvl-c"][[0, 1, 1, 2, 2, 2, 2, 0][i]]),
            )
        })
        .collect();
    let nodes = [node("a", &[], 64000, 65536, &gs)];
    // Four fit only in nvl-c (3..=6); two fit best in the smallest domain that holds them.
    let p = run(&nodes, vec![group("g", 1, 1000, 1024, gpus(4, None, None))]);
    assert_eq!(
        p.placements[0].gpus,
        ["a-gpu3", "a-gpu4", "a-gpu5", "a-gpu6"]
    );
    let p = run(&nodes, vec![group("g", 1, 1000, 1024, gpus(2, None, None))]);
    assert_eq!(p.placements[0].gpus, ["a-gpu0", "a-gpu7"]);
    // Five fit in no domain: split, unless one domain is required.
    let p = run(&nodes, vec![group("g", 1, 1000, 1024, gpus(5, None, None))]);
    assert_eq!(p.placements[0].gpus.len(), 5);
    let mut strict = gpus(5, None, None).unwrap();
    strict.same_interconnect = true;
    let p = run(&nodes, vec![group("g", 1, 1000, 1024, Some(strict))]);
    assert_eq!(
        p.unplaced[0].to_unplaced().reason,
        "0/1 nodes: 1 lacked 5 free GPU in one interconnect group"
    );
}

#[test]
fn impossible_request_explains_why_in_counts() {
    let mut nodes: Vec<Node> = (0..120)
        .map(|i| {
            let country = if i < 80 { "BE" } else { "FR" };
            node(
                &format!("n{i:03}"),
                &[("country", country)],
                64000,
                65536,
                &h100s(2),
            )
        })
        .collect();
    nodes[0].status = NodeStatus::Down;
    let mut g = group("g", 2, 1000, 1024, gpus(4, Some("H100"), Some(40)));
    g.constraints = vec![rule("country", ConstraintOp::In, &["BE", "NL"])];
    let p = run(&nodes, vec![g]);
    assert!(p.placements.is_empty());
    let unplaced = p.unplaced[0].to_unplaced();
    assert_eq!(unplaced.count, 2);
    assert_eq!(
        unplaced.reason,
        "0/120 nodes: 79 lacked 4 free H100 ≥ 40960 MiB, 40 failed country in [BE, NL], 1 not ready"
    );
}

#[test]
fn a_gang_is_placed_whole_or_not_at_all() {
    let nodes = [
        node("a", &[], 64000, 65536, &h100s(8)),
        node("b", &[], 64000, 65536, &h100s(4)),
    ];
    let mut g = group("train", 3, 1000, 1024, gpus(4, None, None));
    g.gang = true;
    let p = run(
        &nodes,
        vec![
            g.clone(),
            group("after", 1, 1000, 1024, gpus(4, None, None)),
        ],
    );
    // The gang needs 12 GPUs; it fits 3 x 4 = 12 exactly.
    assert_eq!(p.placements.len(), 4 - 1);
    assert_eq!(p.unplaced[0].group, "after");
    g.count = 4;
    let p = run(
        &nodes,
        vec![g, group("after", 1, 1000, 1024, gpus(4, None, None))],
    );
    // The gang fails and gives its GPUs back to the next group.
    assert_eq!(on(&p), ["b"]);
    let gang = &p.unplaced[0];
    assert_eq!((gang.missing, gang.gang_fitted), (4, Some(3)));
    assert!(gang
        .to_unplaced()
        .reason
        .starts_with("gang of 4 placed none: 3 fit, then 0/2"));
}

#[test]
fn the_job_s_live_instances_count_for_spread() {
    let nodes = [
        node("a", &[("site", "x")], 8000, 8192, &[]),
        node("b", &[("site", "y")], 8000, 8192, &[]),
    ];
    let existing = live(
        "x",
        "job",
        "a",
        Resources {
            cpu_millis: 1000.into(),
            memory_mib: 1024.into(),
            gpus: None,
        },
        &[],
    );
    let mut g = group("g", 2, 1000, 1024, None);
    g.spread = vec![Spread {
        attribute: "site".to_owned(),
        weight: Some(100),
    }];
    let mut req = request(vec![g]);
    req.groups[0].indices = vec![1];
    let p = plan(&PlanSnapshot::new(&nodes, &[existing]), &req);
    assert_eq!(on(&p), ["b"]);
    assert_eq!(p.placements[0].index, 1);
}

#[test]
fn the_snapshot_knows_who_holds_what() {
    let nodes = [node("a", &[], 64000, 65536, &h100s(4))];
    let allocs = [
        holding("z", "train", "a", ("workers", 1), &["a-gpu2", "a-gpu3"]),
        holding("y", "web", "a", ("front", 0), &[]),
        holding("x", "gone", "nowhere", ("g", 0), &["a-gpu0"]),
    ];
    let snap = PlanSnapshot::with_jobs(&nodes, &allocs, |job, group| {
        (job.as_str() == "train").then_some(GroupInfo {
            priority: 70,
            movable: group != "workers",
            listens: false,
        })
    });
    let held = snap.live_allocations(&NodeId::new("a"));
    let ids: Vec<&str> = held.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["y", "z"]);
    let z = &held[1];
    assert_eq!(
        (z.group.as_str(), z.index, z.gpu_count()),
        ("workers", 1, 2)
    );
    assert_eq!(
        z.info,
        GroupInfo {
            priority: 70,
            movable: false,
            listens: false,
        }
    );
    // Jobs the caller does not know are the lowest priority, and movable.
    assert_eq!(held[0].info, GroupInfo::default());
    assert_eq!(GroupInfo::default().priority, 0);
    assert!(GroupInfo::default().movable);
    assert!(snap.live_allocations(&NodeId::new("nowhere")).is_empty());
    let mut spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "j", "priority": 30, "groups": []
    }))
    .unwrap();
    let mut g = group("pinned", 1, 1000, 1024, None);
    g.movable = false;
    spec.groups.push(g);
    assert_eq!(
        GroupInfo::of(&spec, "pinned"),
        GroupInfo {
            priority: 30,
            movable: false,
            listens: false,
        }
    );
    assert!(GroupInfo::of(&spec, "dropped").movable);
}

#[test]
fn a_request_without_what_was_placed_is_what_is_left() {
    let nodes = [node("a", &[], 4000, 4096, &h100s(2))];
    let mut gang = group("gang", 2, 1000, 1024, gpus(2, None, None));
    gang.gang = true;
    let req = request(vec![group("g", 3, 1000, 1024, gpus(1, None, None)), gang]);
    let p = plan(&PlanSnapshot::new(&nodes, &[]), &req);
    let left = req.without(&p.placements);
    assert_eq!(left.job_id, req.job_id);
    let groups: Vec<(&str, &[u32])> = left
        .groups
        .iter()
        .map(|d| (d.group.name.as_str(), d.indices.as_slice()))
        .collect();
    assert_eq!(groups, [("g", &[2][..]), ("gang", &[0, 1][..])]);
    assert!(req.without(&[]) == req);
}

/// A snapshot's contents in a form that does not depend on the order changes
/// came in.
type Contents = (
    Usage,
    Vec<Vec<LiveAlloc>>,
    HashMap<AllocId, usize>,
    BTreeMap<(JobId, String), Vec<usize>>,
);

fn contents(snap: &PlanSnapshot) -> Contents {
    let instances = snap
        .instances
        .iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            v.sort_unstable();
            (k.clone(), v)
        })
        .collect();
    (
        snap.usage.clone(),
        snap.held.clone(),
        snap.located.clone(),
        instances,
    )
}

/// A state for [`place_one_by_one`] that keeps placements as [`plan`] does.
#[derive(Clone)]
struct OneByOne<'s>(Draft<'s>, Vec<Placement>);

impl<'s> AsRef<Draft<'s>> for OneByOne<'s> {
    fn as_ref(&self) -> &Draft<'s> {
        &self.0
    }
}

#[test]
fn cluster_state_builds_the_snapshot() {
    let state = crate::state::ClusterState::default();
    assert_eq!(state.plan_snapshot().node_count(), 0);
}

#[test]
fn two_thousand_instances_on_two_thousand_nodes() {
    let nodes: Vec<Node> = (0..2000)
        .map(|i| {
            let site = format!("site-{}", i % 20);
            node(
                &format!("n{i:05}"),
                &[("site", &site), ("country", "BE")],
                64000,
                524288,
                &h100s(8),
            )
        })
        .collect();
    let mut g = group("g", 2000, 2000, 8192, gpus(1, Some("H100"), Some(40)));
    g.constraints = vec![rule("country", ConstraintOp::In, &["BE", "NL"])];
    g.spread = vec![Spread {
        attribute: "site".to_owned(),
        weight: Some(50),
    }];
    let req = request(vec![g]);
    let p = plan(&PlanSnapshot::new(&nodes, &[]), &req);
    assert_eq!(p.placements.len(), 2000);
    assert!(p.unplaced.is_empty());
    check_plan(&nodes, &[], &req, &p);
}

fn arb_case() -> impl Strategy<Value = (Vec<Node>, Vec<TaskGroup>, Vec<TaskGroup>)> {
    (1usize..12, 1usize..4, 0usize..3).prop_flat_map(|(n, g, pre)| {
        (
            (0..n).map(arb_node).collect::<Vec<_>>(),
            (0..g).map(arb_group).collect::<Vec<_>>(),
            (0..pre).map(|i| arb_group(i + 10)).collect::<Vec<_>>(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn add_and_remove_keep_the_snapshot_as_a_rebuild_would(
        (nodes, earlier, groups, _) in arb_crowded(),
        split in 0usize..40,
        fate in prop::collection::vec(0u8..4, 40),
    ) {
        let allocs = populate(&nodes, &earlier);
        let info = |job: &JobId, _: &str| Earlier::info(&earlier, job);
        let split = split.min(allocs.len());
        let mut snap = PlanSnapshot::with_jobs(&nodes, &allocs[..split], info);
        for a in &allocs[split..] {
            snap.add(a, info(&a.job_id, &a.group).unwrap_or_default());
        }
        let mut kept = Vec::new();
        for (i, a) in allocs.iter().enumerate() {
            let info = info(&a.job_id, &a.group).unwrap_or_default();
            match fate[i % fate.len()] {
                0 => prop_assert!(snap.remove(&a.id)),
                1 => {
                    let mut stopped = a.clone();
                    stopped.desired = DesiredState::Stop;
                    snap.add(&stopped, info);
                    prop_assert!(!snap.remove(&a.id));
                }
                2 => {
                    // Adding a version the snapshot holds changes nothing.
                    snap.add(a, info);
                    kept.push(a.clone());
                }
                _ => kept.push(a.clone()),
            }
        }
        let rebuilt = PlanSnapshot::with_jobs(&nodes, &kept, info);
        prop_assert_eq!(contents(&snap), contents(&rebuilt));
        let req = request(groups);
        prop_assert_eq!(plan(&snap, &req), plan(&rebuilt, &req));
    }

    #[test]
    fn one_at_a_time_places_as_the_heaps_do((nodes, earlier, groups, _) in arb_crowded()) {
        let allocs = populate(&nodes, &earlier);
        let snap = PlanSnapshot::new(&nodes, &allocs);
        let req = request(groups);
        let mut state = OneByOne(Draft::new(&snap), Vec::new());
        let unplaced = place_one_by_one(&snap, &req, &mut state, |state, group, index| {
            let Some((n, gpus)) = state.0.best(group, &req.job_id, None) else {
                return false;
            };
            let placement = state.0.place(group, &req.job_id, index, n, &gpus);
            state.1.push(placement);
            true
        });
        prop_assert_eq!(plan(&snap, &req), Plan { placements: state.1, unplaced });
    }

    #[test]
    fn plans_never_overcommit_and_are_deterministic((nodes, groups, earlier) in arb_case()) {
        // Earlier jobs become live allocations, so the plan works around them.
        let first = request(earlier);
        let base = PlanSnapshot::new(&nodes, &[]);
        let placed = plan(&base, &first);
        let allocs: Vec<Allocation> = placed
            .placements
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let g = &first.groups.iter().find(|d| d.group.name == p.group).unwrap().group;
                let mut a = live(&format!("a{i}"), "earlier", p.node_id.as_str(), g.resources.clone(), &[]);
                a.gpus = p.gpus.clone();
                a
            })
            .collect();
        check_plan(&nodes, &[], &first, &placed);
        let snapshot = PlanSnapshot::new(&nodes, &allocs);
        let req = request(groups);
        let out = plan(&snapshot, &req);
        check_plan(&nodes, &allocs, &req, &out);
        prop_assert_eq!(&out, &plan(&snapshot, &req));
        let reversed: Vec<Node> = nodes.iter().rev().cloned().collect();
        prop_assert_eq!(&out, &plan(&PlanSnapshot::new(&reversed, &allocs), &req));
        for u in &out.unplaced {
            prop_assert!(u.missing > 0);
            prop_assert_eq!(u.explanation.nodes as usize, nodes.len());
        }
    }
}
