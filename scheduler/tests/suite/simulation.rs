//! Seeded simulations of the Raft driver with the real cluster state machine: message
//! loss and reordering, partitions, crashes that lose unsynced writes. Every job
//! acknowledged to a client must be on every server once the faults heal. Rerun one
//! seed with `AIGRID_SIM_SEED=<seed> cargo test -p aigrid-scheduler --test suite simulation::`.

use std::cell::Cell;

use aigrid_api::{EvalId, EvalTrigger, JobId, JobSpec, Timestamp};
use aigrid_consensus::testkit::{seeds, with_seed, SimConfig, Simulation};
use aigrid_scheduler::state::{ClusterState, Command};
use rand::Rng;

/// A spec named `name` that no other step submits: its command carries `step`, so a
/// submission under a name already taken is always an update (a new version with an
/// evaluation of its own), never an unchanged resubmission.
fn spec(name: &str, count: u64, step: u64) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "kind": "service",
        "groups": [{
            "name": "replica",
            "count": count,
            "resources": {"cpu_millis": 1000, "memory_mib": 1024},
            "task": {"driver": "exec", "command": format!("/bin/serve-{step}")}
        }]
    }))
    .unwrap()
}

/// Whether an acknowledged submission is in `state`, checked by ids and versions:
/// its evaluation names the job and version it made, that job still has the
/// submitted name at that version or a later one, a first submission kept the id
/// it was given, and the job at that very version runs the submitted spec.
/// `updates` counts the acknowledged submissions that updated a job.
fn submission_present(state: &ClusterState, command: &Command, updates: &Cell<usize>) -> bool {
    let Command::SubmitJob {
        job_id,
        eval_id,
        spec,
        ..
    } = command
    else {
        return true;
    };
    let Some(eval) = state.evaluation(eval_id) else {
        return false;
    };
    let Some(job) = state.job(&eval.job_id) else {
        return false;
    };
    let id_kept = match eval.trigger {
        EvalTrigger::JobSubmit => eval.job_id == *job_id && eval.job_version == 1,
        EvalTrigger::JobUpdate => {
            updates.set(updates.get() + 1);
            eval.job_version > 1
        }
        _ => false,
    };
    id_kept
        && job.name == spec.name
        && job.version >= eval.job_version
        && (job.version != eval.job_version || job.spec == *spec)
}

fn run(servers: u64, seeds_count: u64) {
    let mut acknowledged = 0;
    let mut crashes = 0;
    let updates = Cell::new(0);
    for seed in seeds(seeds_count) {
        let config = SimConfig {
            servers,
            fault_ticks: 250,
            ..SimConfig::default()
        };
        let report = with_seed(seed, || {
            Simulation::new(seed, config, ClusterState::default).run(
                |rng, step| {
                    // Names repeat now and then, so some submissions update a job.
                    let n = rng.random_range(0..1_000_000u64);
                    Command::SubmitJob {
                        job_id: JobId::new(format!("job-{step}-{n}")),
                        eval_id: EvalId::new(format!("eval-{step}-{n}")),
                        spec: spec(&format!("j{}", n % 500), 1 + n % 3, step),
                        at: Timestamp::from_millis(step),
                        by: None,
                    }
                },
                |state, command| submission_present(state, command, &updates),
            )
        })
        .unwrap_or_else(|e| panic!("{e}"));
        acknowledged += report.acknowledged;
        crashes += report.crashes;
    }
    assert!(acknowledged > 0, "no job was acknowledged");
    assert!(
        crashes > 0,
        "no server crashed: the faults this test is about never happened"
    );
    assert!(
        updates.get() > 0,
        "no acknowledged submission updated a job: names never repeated"
    );
}

#[test]
fn cluster_state_survives_faults_on_three_servers() {
    run(3, 50);
}

#[test]
fn cluster_state_survives_faults_on_five_servers() {
    run(5, 50);
}
