//! `placement pass`: the leader's whole scheduling pass (`collect` and
//! `plan_pass` over the real cluster state), with circles' quotas off beside on.
//!
//! The same seeded cluster and job stream go into two states, the jobs spread
//! round-robin over `--circles` circles. In one, no circle has a quota: the pass
//! still orders jobs by dominant share. In the other, each circle has an equal
//! quota of the pool's GPUs, so every placement is weighed against its circle's
//! quota, what it borrows is found, and unplaced work is explained in counts.
//! Each state is scheduled pass after pass, each pass's plans applied as the log
//! would apply them, until a pass places nothing; the two are interleaved pass by
//! pass so machine noise falls on both alike. Time counts `collect` and
//! `plan_pass` only, not applying.

use std::time::{Duration, Instant};

use aigrid_api::{EvalId, JobId, Quota, Timestamp};
use aigrid_consensus::state_machine::StateMachine;
use aigrid_scheduler::state::{Applied, ClusterState, Command};
use aigrid_scheduler::worker::{collect, plan_pass};
use anyhow::{Context, Result};

use crate::table::Table;
use crate::workload::{self, Workload, GPUS_PER_NODE};

/// Flags of `placement pass`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    workload: workload::Args,
    /// Circles the jobs are spread over, round-robin.
    #[arg(long, default_value_t = 4)]
    circles: usize,
}

/// One state being scheduled, and what its passes did.
struct Run {
    state: ClusterState,
    index: u64,
    passes: u32,
    placed: u64,
    took: Duration,
    per_pass: Vec<Duration>,
    done: bool,
}

impl Run {
    fn apply(&mut self, command: Command) -> Result<Applied> {
        self.index += 1;
        self.state
            .apply(self.index, command)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// One pass at `now`: collect and plan (timed), then apply.
    fn pass(&mut self, now: Timestamp) -> Result<()> {
        let started = Instant::now();
        let input = collect(&self.state, now, self.passes == 0);
        let mut commands = Vec::new();
        plan_pass(input, |c| commands.push(c));
        let took = started.elapsed();
        self.took += took;
        self.per_pass.push(took);
        self.passes += 1;
        let mut placed = 0;
        for command in commands {
            if let Applied::PlanApplied { placed: n, .. } = self.apply(command)? {
                placed += n;
            }
        }
        self.placed += placed as u64;
        self.done = placed == 0;
        Ok(())
    }
}

/// An equal part of the pool's GPUs of every model for each of `circles`.
fn equal_quota(workload: &Workload, circles: usize) -> Quota {
    let mut gpus: std::collections::BTreeMap<String, u32> = Default::default();
    for node in &workload.nodes {
        for gpu in &node.resources.gpus {
            *gpus.entry(gpu.model.clone()).or_default() += 1;
        }
    }
    let n = u32::try_from(circles).unwrap_or(u32::MAX);
    Quota {
        gpus: gpus.into_iter().map(|(m, c)| (m, c / n)).collect(),
        ..Quota::default()
    }
}

fn state_for(workload: &Workload, circles: usize, quota: Option<&Quota>) -> Result<Run> {
    let mut run = Run {
        state: ClusterState::default(),
        index: 0,
        passes: 0,
        placed: 0,
        took: Duration::ZERO,
        per_pass: Vec::new(),
        done: false,
    };
    let at = Timestamp::from_millis(1_000);
    for node in &workload.nodes {
        run.apply(Command::RegisterNode {
            node: node.clone(),
            join_token: None,
            address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
            at,
        })?;
    }
    if let Some(quota) = quota {
        for c in 0..circles {
            run.apply(Command::SetQuota {
                circle: format!("circle-{c}"),
                quota: Some(quota.clone()),
                by: None,
                at,
            })?;
        }
    }
    for (i, spec) in workload.jobs.iter().enumerate() {
        let mut spec = spec.clone();
        spec.circle = Some(format!("circle-{}", i % circles));
        run.apply(Command::SubmitJob {
            job_id: JobId::new(format!("job-{i}")),
            eval_id: EvalId::new(format!("eval-{i}")),
            spec,
            at,
            by: None,
        })
        .with_context(|| format!("submitting job {i}"))?;
    }
    Ok(run)
}

/// Runs the comparison and prints the table.
pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(args.circles > 0, "--circles must be at least 1");
    let workload = Workload::generate(&args.workload)?;
    let quota = equal_quota(&workload, args.circles);
    eprintln!(
        "==> {} nodes, {} jobs over {} circles; scheduling passes with quotas off and on \
         (each circle: {:?})",
        workload.nodes.len(),
        workload.jobs.len(),
        args.circles,
        quota.gpus
    );
    let mut off = state_for(&workload, args.circles, None)?;
    let mut on = state_for(&workload, args.circles, Some(&quota))?;
    let now = Timestamp::from_millis(2_000);
    for _ in 0..50 {
        if off.done && on.done {
            break;
        }
        if !off.done {
            off.pass(now)?;
        }
        if !on.done {
            on.pass(now)?;
        }
    }
    let per_sec = |r: &Run| r.placed as f64 / r.took.as_secs_f64().max(f64::MIN_POSITIVE);
    let slowest = |r: &Run| {
        r.per_pass
            .iter()
            .max()
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let mut table = Table::new("quotas on", "quotas off");
    table
        .row(
            "instances placed",
            Some(on.placed as f64),
            Some(off.placed as f64),
            0,
        )
        .row(
            "passes",
            Some(f64::from(on.passes)),
            Some(f64::from(off.passes)),
            0,
        )
        .row(
            "collect + plan, s",
            Some(on.took.as_secs_f64()),
            Some(off.took.as_secs_f64()),
            3,
        )
        .row(
            "placements per second",
            Some(per_sec(&on)),
            Some(per_sec(&off)),
            0,
        )
        .row(
            "slowest pass, ms",
            Some(slowest(&on)),
            Some(slowest(&off)),
            1,
        );
    println!(
        "### Scheduling passes with quotas on and off: {} nodes of {GPUS_PER_NODE} GPUs, {} jobs \
         over {} circles, each with an equal part of every GPU model as its quota (seed {})\n",
        workload.nodes.len(),
        workload.jobs.len(),
        args.circles,
        args.workload.seed
    );
    print!("{}", table.render());
    Ok(())
}
