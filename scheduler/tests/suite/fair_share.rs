//! Quotas and fair share through the real state machine and scheduling pass: a
//! circle over its quota is refused with the counts, what a circle borrowed is
//! reclaimed for its owner, and circles contending for one pool converge to
//! their shares, equal without quotas and in proportion to their quotas with.

use crate::sim;

use std::collections::BTreeMap;

use aigrid_api::{AllocState, AllocationReport, JobId, Quota, Timestamp};
use aigrid_scheduler::state::Command;
use serde_json::{json, Value};
use sim::*;

const H100: &str = "NVIDIA H100 80GB HBM3";

fn h100s(n: usize) -> Vec<(&'static str, Option<&'static str>)> {
    vec![(H100, None); n]
}

fn quota(sim: &mut Sim, circle: &str, gpus: u32) {
    let at = sim.at();
    sim.apply(Command::SetQuota {
        circle: circle.into(),
        quota: Some(Quota {
            gpus: [("H100".to_owned(), gpus)].into(),
            ..Quota::default()
        }),
        by: None,
        at,
    })
    .unwrap();
}

/// A job of `circle` with `count` one-GPU instances.
fn job(name: &str, circle: &str, count: u32, kind: &str) -> Value {
    let mut spec = gpu_job(name, 50, count, 1);
    spec["circle"] = json!(circle);
    spec["kind"] = json!(kind);
    spec
}

/// GPUs held by each circle's live allocations.
fn gpus_by_circle(sim: &Sim) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for alloc in sim.state.live_allocations() {
        let circle = sim
            .state
            .job_spec(&alloc.job_id)
            .and_then(|(s, _)| s.circle.clone())
            .unwrap_or_default();
        *out.entry(circle).or_default() += alloc.gpus.len();
    }
    out
}

#[test]
fn a_circle_over_its_quota_is_refused_with_the_counts() {
    let mut sim = Sim::new();
    sim.register("n1", "ghent", &h100s(4));
    quota(&mut sim, "vision", 2);
    quota(&mut sim, "speech", 2);
    sim.submit("speech", job("speech", "speech", 2, "service"));
    sim.settle();
    sim.run_all();
    let vision = sim.submit("vision", job("vision", "vision", 3, "service"));
    sim.settle();
    // Its quota's two GPUs are placed; the third would take one the other
    // circle's quota guarantees and holds.
    assert_eq!(sim.live(&vision).len(), 2);
    let unplaced = sim.job(&vision).unplaced;
    assert_eq!(unplaced.len(), 1, "{unplaced:?}");
    assert_eq!(unplaced[0].count, 1);
    let reason = &unplaced[0].reason;
    assert!(
        reason.contains("circle `vision` would hold 3 of 2 H100 GPUs") && reason.contains("quota"),
        "{reason}"
    );
    assert_eq!(
        gpus_by_circle(&sim)["speech"],
        2,
        "nothing taken from speech"
    );
    let usage = sim.state.circle_usage("vision");
    assert_eq!(usage.used.gpus["H100"], 2.0);
    assert_eq!(usage.pending, 1);
    assert!((usage.share - 1.0).abs() < 1e-9, "{usage:?}");
}

#[test]
fn borrowed_capacity_is_reclaimed_for_its_owner() {
    let mut sim = Sim::new();
    sim.register("n1", "ghent", &h100s(4));
    quota(&mut sim, "vision", 2);
    quota(&mut sim, "speech", 2);
    // Speech is idle: vision borrows its two GPUs.
    let vision = sim.submit("vision", job("vision", "vision", 4, "service"));
    sim.settle();
    sim.run_all();
    assert_eq!(sim.live(&vision).len(), 4);
    let usage = sim.state.circle_usage("vision");
    assert_eq!(usage.borrowed.gpus["H100"], 2.0, "{usage:?}");
    // Speech wants its quota: two of vision's borrowed instances are preempted
    // for it, and vision keeps what its quota guarantees.
    let speech = sim.submit("speech", job("speech", "speech", 2, "service"));
    sim.settle();
    sim.run_all();
    sim.settle();
    assert_eq!(sim.live(&speech).len(), 2, "the owner got its quota back");
    assert_eq!(sim.live(&vision).len(), 2);
    assert!(sim.preempted >= 2);
    let usage = sim.state.circle_usage("vision");
    assert!(usage.borrowed.gpus.is_empty(), "{usage:?}");
    assert_eq!(usage.pending, 2);
}

/// Three circles keep more work queued than the pool holds; batch instances
/// finish now and then and the scheduler fills the room. Answers each circle's
/// GPUs after every round past the first.
fn contend(quotas: &[(&str, u32)]) -> Vec<BTreeMap<String, usize>> {
    let mut sim = Sim::new();
    for n in 0..3 {
        sim.register(&format!("n{n}"), "ghent", &h100s(8));
    }
    for (circle, gpus) in quotas {
        quota(&mut sim, circle, *gpus);
    }
    let circles = ["vision", "speech", "search"];
    let mut submitted = 0;
    let mut rounds = Vec::new();
    for round in 0..8 {
        // Each circle keeps 30 one-GPU batch jobs waiting, the first circle's
        // submitted first: arrival order alone would hand it the pool.
        for circle in circles {
            let waiting = sim
                .state
                .jobs()
                .iter()
                .filter(|j| {
                    let spec = sim.state.job_spec(&j.id);
                    spec.and_then(|(s, _)| s.circle.as_deref()) == Some(circle)
                })
                .count();
            for _ in waiting..30 {
                submitted += 1;
                let name = format!("{circle}-{submitted}");
                sim.submit(&name, job(&name, circle, 1, "batch"));
            }
        }
        sim.settle();
        sim.run_all();
        if round > 0 {
            rounds.push(gpus_by_circle(&sim));
        }
        // A third of the running instances finish.
        let done: Vec<_> = sim
            .state
            .live_allocations()
            .filter(|a| a.state == AllocState::Running)
            .enumerate()
            .filter(|(i, _)| i % 3 == round % 3)
            .map(|(_, a)| (a.node_id.clone(), a.id.clone(), a.job_id.clone()))
            .collect();
        for (node, alloc, job) in done {
            sim.apply(Command::ReportAllocations {
                node_id: node,
                reports: vec![AllocationReport::new(alloc, AllocState::Complete)],
                at: Timestamp::from_millis(sim.now),
            })
            .unwrap();
            let eval = aigrid_api::EvalId::new(format!("done-{}-{}", job, sim.index));
            sim.apply(Command::DeleteJob {
                job_id: JobId::new(job.as_str()),
                eval_id: eval,
                at: Timestamp::from_millis(sim.now),
            })
            .unwrap();
        }
        sim.advance(1_000);
    }
    rounds
}

fn assert_shares(rounds: &[BTreeMap<String, usize>], expected: &[(&str, f64)]) {
    for (i, gpus) in rounds.iter().enumerate() {
        let total: usize = gpus.values().sum();
        assert_eq!(total, 24, "round {i}: the pool is full: {gpus:?}");
        for (circle, share) in expected {
            let held = gpus.get(*circle).copied().unwrap_or(0) as f64 / total as f64;
            assert!(
                (held - share).abs() <= 0.1 * share,
                "round {i}: {circle} holds {held:.3} of the pool, its share is {share:.3}: {gpus:?}"
            );
        }
    }
}

#[test]
fn three_circles_contending_for_one_pool_converge_to_equal_shares() {
    let rounds = contend(&[]);
    let third = 1.0 / 3.0;
    assert_shares(
        &rounds,
        &[("vision", third), ("speech", third), ("search", third)],
    );
}

#[test]
fn with_quotas_contending_circles_converge_to_their_quotas() {
    let rounds = contend(&[("vision", 12), ("speech", 6), ("search", 6)]);
    assert_shares(
        &rounds,
        &[("vision", 0.5), ("speech", 0.25), ("search", 0.25)],
    );
}
