//! `placement planner`: aigrid's pure planner alone, beside first-fit.
//!
//! Both planners get the same jobs in the same order, one job at a time, each
//! seeing the placements of the jobs before it, until the stream is spent. The two
//! are interleaved job by job so that machine noise falls on both alike.
//!
//! - **aigrid**: `plan(&PlanSnapshot, &PlanRequest)` for all of the job's
//!   instances. The placements become allocations, added to the one snapshot
//!   with `PlanSnapshot::add` before the next job, as the leader's worker does
//!   within a scheduling pass. Plan time counts only the `plan` calls; the
//!   snapshot updates are timed apart and left out of it.
//! - **first-fit**: [`first_fit::place`] on its own occupancy, updated in place;
//!   its plan time is all of its work, compiling the job's constraints included.
//!
//! aigrid's placements are checked on an independent occupancy after each plan,
//! outside the timing; a wrong placement stops the run. A digest of every plan
//! aigrid made goes to stderr: a change meant to make the planner faster without
//! changing its decisions must leave it as it was (under one toolchain, whose
//! hasher it uses).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use aigrid_api::{Allocation, JobId, JobSpec, Node, NodeRegistration};
use aigrid_scheduler::planner::{plan, GroupInfo, Placement, PlanRequest, PlanSnapshot};
use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::first_fit;
use crate::occupancy::{Demand, Occupancy, Quality};
use crate::table::Table;
use crate::workload::{self, Workload, GPUS_PER_NODE};

/// Flags of `placement planner`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    workload: workload::Args,
}

/// What one planner did over the stream.
#[derive(Debug, Default)]
struct Tally {
    jobs_whole: u64,
    placements: u64,
    gpus: u64,
    plan: Duration,
    per_job: Vec<Duration>,
    /// Per group with a spread and at least two instances placed: the share on
    /// its busiest value, and how many values it used.
    spread: Vec<(f64, usize)>,
}

impl Tally {
    /// Records one job: per group, the positions of the nodes its instances went to.
    fn record(
        &mut self,
        occupancy: &Occupancy,
        demands: &[Demand],
        placed: &[Vec<usize>],
        took: Duration,
    ) {
        let mut whole = true;
        for (demand, positions) in demands.iter().zip(placed) {
            let group = demand.group;
            let placed = positions.len() as u64;
            whole &= placed == u64::from(group.count);
            self.placements += placed;
            self.gpus += placed * u64::from(group.resources.gpus.as_ref().map_or(0, |g| g.count));
            if let Some(spread) = group.spread.first() {
                if positions.len() >= 2 {
                    self.spread
                        .push(occupancy.busiest_share(positions, &spread.attribute));
                }
            }
        }
        self.jobs_whole += u64::from(whole);
        self.plan += took;
        self.per_job.push(took);
    }

    fn placements_per_sec(&self, time: Duration) -> f64 {
        self.placements as f64 / time.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Nearest-rank percentile of the per-job plan times, in milliseconds.
    fn per_job_ms(&self, p: f64) -> f64 {
        let mut sorted = self.per_job.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted
            .get(rank.clamp(1, sorted.len().max(1)) - 1)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }

    /// Means over spread groups of the busiest value's share (percent) and of the
    /// values used.
    fn spread_means(&self) -> (f64, f64) {
        let n = self.spread.len().max(1) as f64;
        let share: f64 = self.spread.iter().map(|(s, _)| s).sum();
        let values: usize = self.spread.iter().map(|(_, v)| v).sum();
        (share * 100.0 / n, values as f64 / n)
    }
}

/// Runs the comparison and prints the table.
pub fn run(args: &Args) -> Result<()> {
    let workload = Workload::generate(&args.workload)?;
    let nodes: Vec<Node> = workload
        .nodes
        .iter()
        .map(ready_node)
        .collect::<Result<_>>()?;
    let template = allocation_template()?;
    eprintln!(
        "==> {} nodes, {} jobs; placing with aigrid and first-fit, job by job",
        nodes.len(),
        workload.jobs.len()
    );

    let mut snapshot = PlanSnapshot::new(&nodes, &[]);
    let mut checked = Occupancy::new(&nodes);
    let mut baseline = Occupancy::new(&nodes);
    let (mut ours, mut theirs) = (Tally::default(), Tally::default());
    let mut update_time = Duration::ZERO;
    // Every plan aigrid made, so that two builds of the planner can be compared.
    let mut digest = DefaultHasher::new();
    for spec in &workload.jobs {
        let job_id = JobId::new(spec.name.as_str());
        let request = PlanRequest::whole_job(job_id.clone(), spec);
        let started = Instant::now();
        let planned = plan(&snapshot, &request);
        let took = started.elapsed();
        format!("{planned:?}").hash(&mut digest);
        let demands = compile(spec)?;
        let mut placed = vec![Vec::new(); demands.len()];
        let mut allocations = Vec::with_capacity(planned.placements.len());
        for p in &planned.placements {
            let g = demands
                .iter()
                .position(|d| d.group.name == p.group)
                .with_context(|| {
                    format!("aigrid placed unknown group {} of {}", p.group, spec.name)
                })?;
            let at = checked
                .check_and_take(&demands[g], &p.node_id, &p.gpus)
                .with_context(|| format!("aigrid's plan for {}", spec.name))?;
            placed[g].push(at);
            let info = GroupInfo::of(spec, &p.group);
            allocations.push((allocation(&template, &job_id, &demands[g], p), info));
        }
        ensure!(
            demands
                .iter()
                .zip(&placed)
                .all(|(d, p)| p.len() <= d.group.count as usize),
            "aigrid placed more instances of {} than asked",
            spec.name
        );
        ours.record(&checked, &demands, &placed, took);
        let started = Instant::now();
        for (alloc, info) in &allocations {
            snapshot.add(alloc, *info);
        }
        update_time += started.elapsed();

        let started = Instant::now();
        let demands = compile(spec)?;
        let placed: Vec<Vec<usize>> = demands
            .iter()
            .map(|d| first_fit::place(&mut baseline, d))
            .collect();
        let took = started.elapsed();
        theirs.record(&baseline, &demands, &placed, took);
    }

    eprintln!("==> digest of aigrid's plans: {:016x}", digest.finish());
    print_report(
        args,
        &workload,
        &ours,
        &theirs,
        &checked,
        &baseline,
        update_time,
    );
    Ok(())
}

/// The job's groups, compiled.
fn compile(spec: &JobSpec) -> Result<Vec<Demand<'_>>> {
    spec.groups.iter().map(Demand::new).collect()
}

/// A registered node as the state machine holds it: ready, with its registration.
fn ready_node(registration: &NodeRegistration) -> Result<Node> {
    let mut node = serde_json::to_value(registration)?;
    node["status"] = json!("ready");
    node["registered_at"] = json!(0);
    node["last_seen"] = json!(0);
    serde_json::from_value(node).context("a node from its registration")
}

/// An allocation to copy for each placement, built from JSON so that fields the
/// API gains with defaults need no change here.
fn allocation_template() -> Result<Allocation> {
    serde_json::from_value(json!({
        "id": "",
        "job_id": "",
        "job_version": 1,
        "node_id": "",
        "group": "",
        "index": 0,
        "resources": {"cpu_millis": 0, "memory_mib": 0},
        "state": "pending",
        "desired": "run",
        "created_at": 0,
        "updated_at": 0,
    }))
    .context("the allocation template")
}

/// The allocation a placement commits, as the worker would write it.
fn allocation(template: &Allocation, job_id: &JobId, demand: &Demand, p: &Placement) -> Allocation {
    let mut alloc = template.clone();
    alloc.id = format!("{job_id}-{}-{}", p.group, p.index).into();
    alloc.job_id = job_id.clone();
    alloc.node_id = p.node_id.clone();
    alloc.group = p.group.clone();
    alloc.index = p.index;
    alloc.resources = demand.group.resources.clone();
    alloc.gpus = p.gpus.clone();
    alloc
}

fn print_report(
    args: &Args,
    workload: &Workload,
    ours: &Tally,
    theirs: &Tally,
    checked: &Occupancy,
    baseline: &Occupancy,
    update_time: Duration,
) {
    let w = &args.workload;
    let mix: Vec<String> = workload
        .node_mix()
        .iter()
        .map(|(model, n)| format!("{n} {model}"))
        .collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (q_ours, q_theirs) = (checked.quality(), baseline.quality());
    let usable = q_ours.gpus_usable.max(1) as f64;
    let (spread_ours, spread_theirs) = (ours.spread_means(), theirs.spread_means());
    let both = |f: &dyn Fn(&Tally) -> f64| (Some(f(ours)), Some(f(theirs)));
    let quality =
        |f: &dyn Fn(&Quality) -> u64| (Some(f(&q_ours) as f64), Some(f(&q_theirs) as f64));
    let mut table = Table::new("aigrid", "first-fit");
    let mut add = |metric: &str, (l, r): (Option<f64>, Option<f64>), decimals: usize| {
        table.row(metric, l, r, decimals);
    };
    add("jobs placed whole", both(&|t| t.jobs_whole as f64), 0);
    add("instances placed", both(&|t| t.placements as f64), 0);
    add(
        "GPUs placed, % of usable",
        both(&|t| t.gpus as f64 * 100.0 / usable),
        1,
    );
    add("plan time, s", both(&|t| t.plan.as_secs_f64()), 3);
    add(
        "**placements/s** (plan time)",
        both(&|t| t.placements_per_sec(t.plan)),
        0,
    );
    add(
        "plan time per job p50, ms",
        both(&|t| t.per_job_ms(50.0)),
        3,
    );
    add(
        "plan time per job p99, ms",
        both(&|t| t.per_job_ms(99.0)),
        3,
    );
    add(
        "plan time per job max, ms",
        both(&|t| t.per_job_ms(100.0)),
        3,
    );
    add(
        "nodes with GPUs partly used",
        quality(&|q| q.partly_used_nodes),
        0,
    );
    add(
        "free GPUs stranded on those nodes",
        quality(&|q| q.stranded_gpus),
        0,
    );
    add(
        "8-GPU instances that still fit",
        quality(&|q| q.eight_gpu_slots),
        0,
    );
    add(
        "spread jobs: busiest site's share, mean %",
        (Some(spread_ours.0), Some(spread_theirs.0)),
        1,
    );
    add(
        "spread jobs: sites used, mean",
        (Some(spread_ours.1), Some(spread_theirs.1)),
        1,
    );

    println!(
        "Placement, planner alone: {} nodes x {GPUS_PER_NODE} GPUs ({}; {} usable GPUs), {} sites; \
         {} jobs asking {} instances and {} GPUs; seed {}; {cpus} CPUs",
        workload.nodes.len(),
        mix.join(", "),
        q_ours.gpus_usable,
        w.sites,
        workload.jobs.len(),
        workload.instances(),
        workload.gpus_asked(),
        w.seed,
    );
    println!();
    print!("{}", table.render());
    println!();
    println!(
        "aigrid: times are plan time only, the sum of the plan() calls, one per job. One PlanSnapshot \
         serves the whole stream: after each job its placements are added with PlanSnapshot::add, as \
         the leader's worker does within a scheduling pass; those updates took {:.3} s and are not in \
         plan time. first-fit updates its state in place, all inside its plan time. Every aigrid \
         placement was checked (ready node, constraints, CPU, memory, suitable free GPUs).",
        update_time.as_secs_f64(),
    );
}
