//! Seeded simulations of the Raft driver with the real cluster state machine: message
//! loss and reordering, partitions, crashes that lose unsynced writes. Every job
//! acknowledged to a client must be on every server once the faults heal. Rerun one
//! seed with `AIGRID_SIM_SEED=<seed> cargo test -p aigrid-scheduler --test simulation`.

use aigrid_api::{EvalId, JobId, JobSpec, Timestamp};
use aigrid_consensus::testkit::{seeds, with_seed, SimConfig, Simulation};
use aigrid_scheduler::state::{ClusterState, Command};
use rand::Rng;

fn spec(name: &str, count: u64) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "kind": "service",
        "groups": [{
            "name": "replica",
            "count": count,
            "resources": {"cpu_millis": 1000, "memory_mib": 1024},
            "task": {"driver": "exec", "command": "/bin/serve"}
        }]
    }))
    .unwrap()
}

fn run(servers: u64, seeds_count: u64) {
    let mut acknowledged = 0;
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
                        spec: spec(&format!("j{}", n % 500), 1 + n % 3),
                        at: Timestamp::from_millis(step),
                    }
                },
                |state, command| match command {
                    Command::SubmitJob { spec, .. } => state.job_by_name(&spec.name).is_some(),
                    _ => true,
                },
            )
        })
        .unwrap_or_else(|e| panic!("{e}"));
        acknowledged += report.acknowledged;
    }
    assert!(acknowledged > 0, "no job was acknowledged");
}

#[test]
fn cluster_state_survives_faults_on_three_servers() {
    run(3, 50);
}

#[test]
fn cluster_state_survives_faults_on_five_servers() {
    run(5, 50);
}
