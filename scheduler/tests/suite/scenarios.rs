//! The scheduling loop's decisions over simulated time: the real state machine and
//! the real pass (`collect`, `plan_pass`, `expire_nodes`), with commands applied in
//! order as Raft would and agents played by explicit reports.

use crate::sim;

use aigrid_api::{
    AllocState, AllocationReport, DrainSpec, EvalStatus, EvalTrigger, GpuHealth, NodeId,
    NodeStatus, Timestamp,
};
use aigrid_scheduler::state::{reschedule_delay_ms, Command};
use serde_json::json;
use sim::*;

#[test]
fn a_fragmented_cluster_is_defragmented_moving_the_fewest_allocations() {
    let mut sim = Sim::new();
    let h100 = [("NVIDIA H100", None); 8];
    sim.register("n1", "a", &h100);
    sim.register("n2", "b", &h100);
    // Three single-GPU instances of one job and one of another, four GPUs used on
    // each node: pinned by hand through a first job that spreads.
    let small = sim.submit(
        "small",
        json!({"name": "small", "priority": 10, "groups": [{
            "name": "g", "count": 8, "max_unavailable": 8, "spread": [{"attribute": "site"}],
            "resources": {"cpu_millis": 1000, "memory_mib": 1024, "gpus": {"count": 1}},
            "task": exec()}]}),
    );
    sim.settle();
    sim.run_all();
    let before = sim.live(&small);
    assert_eq!(before.len(), 8);
    let on = |n: &str| before.iter().filter(|a| a.node_id.as_str() == n).count();
    assert_eq!((on("n1"), on("n2")), (4, 4));

    let big = sim.submit("big", gpu_job("big", 50, 1, 8));
    sim.settle();
    let placed = sim.live(&big);
    assert_eq!(placed.len(), 1, "{:?}", sim.job(&big).unplaced);
    assert_eq!(placed[0].gpus.len(), 8);
    let target = placed[0].node_id.clone();
    let after = sim.live(&small);
    assert_eq!(after.len(), 8, "every moved instance runs elsewhere");
    assert!(after.iter().all(|a| a.node_id != target));
    let moved = after.iter().filter(|a| a.previous.is_some()).count();
    assert_eq!(moved, 4, "only the four allocations on the target moved");
    assert_eq!(
        (sim.migrated, sim.preempted),
        (4, 0),
        "counted as migrations"
    );
}

#[test]
fn a_silent_node_is_marked_down_and_its_work_rescheduled_after_the_backoff() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 2]);
    let job = sim.submit("svc", gpu_job("svc", 50, 1, 1));
    sim.settle();
    sim.run_all();
    let first = sim.live(&job)[0].clone();
    assert_eq!(first.node_id.as_str(), "n1");
    sim.register("n2", "b", &[("NVIDIA H100", None); 2]);
    let silent_since = sim.now;

    // n2 keeps reporting, n1 goes silent.
    let mut down_at = None;
    while sim.now < silent_since + 2 * TTL.as_millis() as u64 {
        sim.advance(1_000);
        sim.heartbeat("n2", vec![]);
        sim.expire();
        sim.pass();
        if down_at.is_none()
            && sim.state.node(&NodeId::new("n1")).unwrap().status == NodeStatus::Down
        {
            down_at = Some(sim.now);
        }
        if sim.live(&job).iter().any(|a| a.node_id.as_str() == "n2") {
            break;
        }
    }
    let down_at = down_at.expect("the silent node was marked down");
    assert!(down_at - silent_since <= TTL.as_millis() as u64 + 1_000);
    let live = sim.live(&job);
    assert_eq!(nodes_of(&live), ["n2"]);
    let rescheduled_after = sim.now - silent_since;
    assert!(
        rescheduled_after <= TTL.as_millis() as u64 + reschedule_delay_ms(0) + 2_000,
        "rescheduled {rescheduled_after} ms after the node went silent"
    );
    assert_eq!(live[0].previous.as_ref(), Some(&first.id));
    assert_eq!(live[0].reschedules, 1);
    assert!(
        sim.job(&job).allocations.iter().all(|a| a.id != first.id),
        "the lost allocation was replaced"
    );
}

#[test]
fn reschedules_back_off_exponentially() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 1]);
    sim.register("n2", "b", &[("NVIDIA H100", None); 1]);
    let job = sim.submit("svc", gpu_job("svc", 50, 1, 1));
    sim.settle();
    for attempt in 0..4u32 {
        let alloc = sim.live(&job)[0].clone();
        assert_eq!(alloc.reschedules, attempt);
        let at = sim.at();
        sim.apply(Command::ReportAllocations {
            node_id: alloc.node_id.clone(),
            reports: vec![AllocationReport::new(alloc.id.clone(), AllocState::Failed)],
            at,
        })
        .unwrap();
        let eval = sim
            .state
            .evaluations(EvalStatus::Pending)
            .into_iter()
            .find(|e| e.trigger == EvalTrigger::AllocFailed)
            .unwrap();
        let delay = reschedule_delay_ms(attempt);
        assert_eq!(
            eval.wait_until,
            Some(Timestamp::from_millis(sim.now + delay))
        );
        sim.advance(delay - 1);
        sim.pass();
        assert!(sim.live(&job).is_empty(), "not before the backoff");
        sim.advance(1);
        sim.pass();
        assert_eq!(sim.live(&job).len(), 1);
    }
    assert_eq!(reschedule_delay_ms(1), 2 * reschedule_delay_ms(0));
}

#[test]
fn the_backoff_holds_when_something_else_plans_the_job_sooner() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 1]);
    let job = sim.submit("svc", gpu_job("svc", 50, 2, 1));
    sim.settle();
    assert_eq!(
        sim.live(&job).len(),
        1,
        "one GPU, one instance; the other waits"
    );
    let alloc = sim.live(&job)[0].clone();
    let at = sim.at();
    sim.apply(Command::ReportAllocations {
        node_id: alloc.node_id.clone(),
        reports: vec![AllocationReport::new(alloc.id.clone(), AllocState::Failed)],
        at,
    })
    .unwrap();
    // New capacity retries the blocked evaluation at once: it places the instance
    // that never ran, not the one that just failed.
    sim.register("n2", "b", &[("NVIDIA H100", None); 1]);
    sim.settle();
    let live = sim.live(&job);
    assert_eq!(live.len(), 1);
    assert_ne!(live[0].index, alloc.index, "the failed instance waits");
    sim.advance(reschedule_delay_ms(0));
    sim.settle();
    assert_eq!(sim.live(&job).len(), 2);
}

#[test]
fn an_unhealthy_gpu_moves_only_its_allocation() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 4]);
    let job = sim.submit("svc", gpu_job("svc", 50, 3, 1));
    sim.settle();
    sim.run_all();
    let before = sim.live(&job);
    let sick = before[1].clone();
    sim.heartbeat(
        "n1",
        vec![GpuHealth {
            uuid: sick.gpus[0].clone(),
            healthy: false,
            reason: Some("XID 79".into()),
        }],
    );
    let node = sim.state.node(&NodeId::new("n1")).unwrap();
    let gpu = node
        .resources
        .gpus
        .iter()
        .find(|g| g.uuid == sick.gpus[0])
        .unwrap();
    assert!(!gpu.healthy);
    assert_eq!(gpu.health_reason.as_deref(), Some("XID 79"));
    sim.advance(reschedule_delay_ms(0));
    sim.settle();
    let after = sim.live(&job);
    assert_eq!(after.len(), 3);
    for (b, a) in before.iter().zip(&after) {
        if b.id == sick.id {
            assert_ne!(a.gpus, sick.gpus, "moved off the sick GPU");
            assert_eq!(a.previous.as_ref(), Some(&sick.id));
        } else {
            assert_eq!(a.id, b.id, "healthy instances stay put");
        }
    }
    let usage = sim.state.node(&NodeId::new("n1")).unwrap().usage.unwrap();
    assert_eq!((usage.gpus_used, usage.gpus_free), (3, 0));
}

#[test]
fn preemption_evicts_the_lowest_priority_sufficient_set_and_requeues_it() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 2]);
    sim.register("n2", "b", &[("NVIDIA H100", None); 2]);
    let low = sim.submit("low", gpu_job("low", 10, 2, 1));
    let mid = sim.submit("mid", gpu_job("mid", 30, 2, 1));
    sim.settle();
    sim.run_all();
    assert_eq!(sim.live(&low).len() + sim.live(&mid).len(), 4);

    // Within 10 points of `low`: waits instead of evicting.
    let near = sim.submit("near", gpu_job("near", 15, 1, 1));
    sim.settle();
    assert!(sim.live(&near).is_empty());
    assert_eq!(sim.live(&low).len(), 2);

    let high = sim.submit("high", gpu_job("high", 50, 1, 2));
    sim.settle();
    assert_eq!(sim.live(&high).len(), 1, "{:?}", sim.job(&high).unplaced);
    assert_eq!(
        sim.live(&mid).len(),
        2,
        "the higher of the victims is spared"
    );
    assert!(sim.live(&low).is_empty());
    let requeued = sim.job(&low);
    assert!(
        !requeued.unplaced.is_empty(),
        "evicted work is planned again and waits with a reason"
    );
    assert_eq!(
        (sim.preempted, sim.migrated),
        (2, 0),
        "counted as preemptions"
    );
}

#[test]
fn a_drain_migrates_at_most_max_parallel_at_a_time() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 4]);
    let job = sim.submit("svc", gpu_job("svc", 50, 4, 1));
    sim.settle();
    sim.run_all();
    sim.register("n2", "b", &[("NVIDIA H100", None); 4]);
    let at = sim.at();
    sim.apply(Command::DrainNode {
        node_id: NodeId::new("n1"),
        drain: DrainSpec { max_parallel: 2 },
        at,
    })
    .unwrap();
    sim.pass();
    let moved = |sim: &Sim| {
        sim.live(&job)
            .iter()
            .filter(|a| a.node_id.as_str() == "n2")
            .count()
    };
    assert_eq!(moved(&sim), 2);
    sim.pass();
    assert_eq!(moved(&sim), 2, "waits for the stops to be confirmed");
    sim.run_all();
    sim.pass();
    assert_eq!(moved(&sim), 4);
    sim.run_all();
    let node = sim.state.node(&NodeId::new("n1")).unwrap();
    assert_eq!(node.status, NodeStatus::Draining);
    assert_eq!(node.usage.unwrap().allocations, 0);
}

#[test]
fn spread_over_three_sites_puts_three_replicas_on_three_sites() {
    let mut sim = Sim::new();
    for (n, site) in [
        ("n1", "a"),
        ("n2", "a"),
        ("n3", "b"),
        ("n4", "b"),
        ("n5", "c"),
    ] {
        sim.register(n, site, &[("NVIDIA H100", None); 8]);
    }
    let job = sim.submit(
        "web",
        json!({"name": "web", "groups": [{
            "name": "g", "count": 3, "spread": [{"attribute": "site"}],
            "resources": {"cpu_millis": 1000, "memory_mib": 1024, "gpus": {"count": 1}},
            "task": exec()}]}),
    );
    sim.settle();
    let sites: std::collections::BTreeSet<String> = sim
        .live(&job)
        .iter()
        .map(|a| sim.state.node(&a.node_id).unwrap().attributes["site"].clone())
        .collect();
    assert_eq!(sites.len(), 3);
}

#[test]
fn a_sixteen_gpu_gang_lands_on_shared_interconnect_groups() {
    let mut sim = Sim::new();
    // Two nodes whose GPUs are split over two NVLink domains, two with one.
    let split: Vec<(&str, Option<&str>)> = (0..8)
        .map(|i| {
            (
                "NVIDIA H100",
                Some(if i % 2 == 0 { "nvl0" } else { "nvl1" }),
            )
        })
        .collect();
    let whole = [("NVIDIA H100", Some("nvl0")); 8];
    sim.register("a-split", "a", &split);
    sim.register("b-split", "a", &split);
    sim.register("c-whole", "b", &whole);
    sim.register("d-whole", "b", &whole);
    let job = sim.submit(
        "train",
        json!({"name": "train", "kind": "training", "groups": [{
            "name": "workers", "count": 2, "gang": true,
            "resources": {"cpu_millis": 8000, "memory_mib": 65536,
                          "gpus": {"count": 8, "same_interconnect": true}},
            "task": exec()}]}),
    );
    sim.settle();
    let live = sim.live(&job);
    assert_eq!(live.len(), 2, "{:?}", sim.job(&job).unplaced);
    let mut nodes = nodes_of(&live);
    nodes.sort();
    assert_eq!(nodes, ["c-whole", "d-whole"]);
}

#[test]
fn impossible_requests_stay_pending_with_an_explanation() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 2]);
    let job = sim.submit(
        "nope",
        json!({"name": "nope", "groups": [{
            "name": "g", "count": 2,
            "constraints": [{"attribute": "country", "op": "in", "value": ["NL", "DE"]}],
            "resources": {"cpu_millis": 1000, "memory_mib": 1024,
                          "gpus": {"count": 4, "model": "B200"}},
            "task": exec()}]}),
    );
    sim.settle();
    let view = sim.job(&job);
    assert!(view.allocations.is_empty());
    assert_eq!(view.unplaced.len(), 1);
    assert_eq!(view.unplaced[0].count, 2);
    assert_eq!(
        view.unplaced[0].reason,
        "0/1 nodes: 1 failed country in [NL, DE]"
    );
}
