//! Rollouts over the real state machine and scheduling pass: canaries beside the
//! running instances, promotion, batches of `max_parallel` gated on health, pause,
//! deadlines, and the automatic revert that leaves the old version running
//! throughout. The leader's verdicts are given as the watcher would commit them.

use crate::sim;

use aigrid_api::{
    AllocId, Allocation, Deployment, DeploymentAction, DeploymentState, EvalId, JobId, JobSpec,
};
use aigrid_scheduler::state::{Applied, Command, CommandOutput, Verdict};
use serde_json::{json, Value};
use sim::*;

fn service(command: &str, count: u32, update: Value) -> Value {
    json!({"name": "web", "kind": "service", "groups": [{
        "name": "g", "count": count,
        "resources": {"cpu_millis": 500, "memory_mib": 256},
        "update": update,
        "task": {"driver": "exec", "command": command}}]})
}

/// Three nodes, and version 1 of `web` running three instances.
fn running_v1(update: Value) -> (Sim, JobId) {
    let mut sim = Sim::new();
    for (i, site) in ["a", "b", "c"].iter().enumerate() {
        sim.register(&format!("n{i}"), site, &[]);
    }
    let job = sim.submit("web", service("/bin/v1", 3, update));
    sim.settle();
    sim.run_all();
    assert_eq!(sim.live(&job).len(), 3);
    (sim, job)
}

fn deployment(sim: &Sim, job: &JobId) -> Deployment {
    sim.job(job).deployment.expect("a rollout")
}

fn judge(sim: &mut Sim, job: &JobId, ids: &[AllocId], healthy: bool) -> CommandOutput {
    let version = sim.job(job).version;
    let at = sim.at();
    let verdicts = ids
        .iter()
        .map(|id| Verdict {
            id: id.clone(),
            healthy,
            reason: (!healthy).then(|| "exited with code 3".to_owned()),
        })
        .collect();
    sim.apply(Command::JudgeAllocations {
        job_id: job.clone(),
        version,
        verdicts,
        eval_id: EvalId::new(format!("judge-{}", sim.index)),
        at,
    })
}

fn steer(sim: &mut Sim, job: &JobId, action: DeploymentAction) -> CommandOutput {
    let version = deployment(sim, job).version;
    let at = sim.at();
    sim.apply(Command::SteerDeployment {
        job_id: job.clone(),
        version,
        action,
        eval_id: EvalId::new(format!("steer-{}", sim.index)),
        at,
        by: None,
    })
}

/// The leader's report that the rollout's progress deadline passed, now.
fn deadline_seen(sim: &mut Sim, job: &JobId) {
    let version = deployment(sim, job).version;
    let at = sim.at();
    sim.apply(Command::DeploymentDeadline {
        job_id: job.clone(),
        version,
        eval_id: EvalId::new(format!("deadline-{}", sim.index)),
        at,
    })
    .unwrap();
}

/// The live instances of the job's current version not judged yet.
fn unjudged(sim: &Sim, job: &JobId) -> Vec<AllocId> {
    let version = sim.job(job).version;
    sim.live(job)
        .into_iter()
        .filter(|a| a.job_version == version && a.healthy.is_none())
        .map(|a| a.id)
        .collect()
}

fn of_version(allocs: &[Allocation], version: u64) -> usize {
    allocs.iter().filter(|a| a.job_version == version).count()
}

fn command_of(allocs: &[Allocation], sim: &Sim, job: &JobId) -> Vec<String> {
    let versions = sim.state.job_versions(job.as_str()).unwrap();
    allocs
        .iter()
        .map(|a| {
            let spec = &versions
                .iter()
                .find(|v| v.version == a.job_version)
                .unwrap()
                .spec;
            match &spec.groups[0].task {
                aigrid_api::TaskSpec::Exec(e) => e.command.clone(),
                aigrid_api::TaskSpec::ModelServer(m) => m.model.clone(),
            }
        })
        .collect()
}

#[test]
fn canaries_wait_for_promotion_then_instances_roll_one_batch_at_a_time() {
    let update = json!({"canary": 1, "max_parallel": 1, "min_healthy_time": "1s",
                        "healthy_deadline": "30s", "progress_deadline": "2m"});
    let (mut sim, job) = running_v1(update.clone());
    sim.submit("web", service("/bin/v2", 3, update));
    sim.settle();
    let live = sim.live(&job);
    assert_eq!(live.len(), 4, "a canary beside the three running: {live:?}");
    assert_eq!(live.iter().filter(|a| a.canary).count(), 1);
    assert_eq!(of_version(&live, 1), 3);
    let d = deployment(&sim, &job);
    assert_eq!((d.version, d.state), (2, DeploymentState::Running));
    assert_eq!(d.groups[0].canary_percent, Some(25));

    // Promotion before the canary is healthy is refused and changes nothing.
    sim.run_all();
    let refused = steer(&mut sim, &job, DeploymentAction::Promote).unwrap_err();
    assert!(
        refused.to_string().contains("0 healthy canaries of 1"),
        "{refused}"
    );

    let canary = unjudged(&sim, &job);
    assert_eq!(canary.len(), 1);
    judge(&mut sim, &job, &canary, true).unwrap();
    assert_eq!(
        deployment(&sim, &job).state,
        DeploymentState::AwaitingPromotion
    );
    sim.settle();
    assert_eq!(
        of_version(&sim.live(&job), 1),
        3,
        "nothing replaced before promotion"
    );

    steer(&mut sim, &job, DeploymentAction::Promote).unwrap();
    sim.settle();
    sim.run_all();
    // The canary took index 0's place; one more instance (max_parallel 1) rolls.
    let live = sim.live(&job);
    assert_eq!(live.len(), 3, "{live:?}");
    assert_eq!(of_version(&live, 2), 2);
    assert!(live.iter().all(|a| !a.canary));
    sim.settle();
    assert_eq!(
        of_version(&sim.live(&job), 2),
        2,
        "the batch waits for its health"
    );

    let batch = unjudged(&sim, &job);
    assert_eq!(batch.len(), 1);
    judge(&mut sim, &job, &batch, true).unwrap();
    sim.settle();
    sim.run_all();
    assert_eq!(of_version(&sim.live(&job), 2), 3);
    assert_eq!(deployment(&sim, &job).state, DeploymentState::Running);
    let last = unjudged(&sim, &job);
    assert_eq!(last.len(), 1);
    judge(&mut sim, &job, &last, true).unwrap();
    let d = deployment(&sim, &job);
    assert_eq!(d.state, DeploymentState::Successful, "{d:?}");
    assert_eq!((d.healthy, d.desired), (3, 3));
    assert_eq!(command_of(&sim.live(&job), &sim, &job), vec!["/bin/v2"; 3]);
}

#[test]
fn an_unhealthy_canary_reverts_while_the_old_version_keeps_running() {
    let update = json!({"canary": 1, "auto_revert": true, "min_healthy_time": "1s",
                        "healthy_deadline": "30s"});
    let (mut sim, job) = running_v1(update.clone());
    let old: Vec<AllocId> = sim.live(&job).into_iter().map(|a| a.id).collect();
    sim.submit("web", service("/bin/broken", 3, update));
    sim.settle();
    sim.run_all();
    let canary = unjudged(&sim, &job);
    assert_eq!(canary.len(), 1);
    let out = judge(&mut sim, &job, &canary, false).unwrap();
    let Applied::DeploymentChanged(Some(d)) = out else {
        panic!("{out:?}")
    };
    assert_eq!(d.state, DeploymentState::Reverted, "{d:?}");
    assert_eq!(d.reverted_to, Some(3));
    assert!(
        d.description.contains("exited with code 3"),
        "{}",
        d.description
    );
    // Version 3 is version 1 again; its instances were never touched.
    let v = sim.job(&job);
    assert_eq!(v.version, 3);
    let v1: JobSpec = serde_json::from_value(service(
        "/bin/v1",
        3,
        json!({"canary": 1,
        "auto_revert": true, "min_healthy_time": "1s", "healthy_deadline": "30s"}),
    ))
    .unwrap();
    assert_eq!(v.spec, v1);
    sim.settle();
    sim.run_all();
    let live: Vec<AllocId> = sim.live(&job).into_iter().map(|a| a.id).collect();
    assert_eq!(
        live, old,
        "the canary stopped and the old instances kept running"
    );
    assert!(sim
        .job(&job)
        .allocations
        .iter()
        .all(|a| a.id != canary[0] || !a.is_live()));
}

#[test]
fn a_paused_rollout_replaces_nothing_and_outlives_its_progress_deadline() {
    let update = json!({"max_parallel": 1, "min_healthy_time": "1s",
                        "healthy_deadline": "10s", "progress_deadline": "20s"});
    let (mut sim, job) = running_v1(update.clone());
    sim.submit("web", service("/bin/v2", 3, update));
    sim.settle();
    sim.run_all();
    assert_eq!(of_version(&sim.live(&job), 2), 1, "one batch of one");
    steer(&mut sim, &job, DeploymentAction::Pause).unwrap();
    let first = unjudged(&sim, &job);
    judge(&mut sim, &job, &first, true).unwrap();
    sim.settle();
    assert_eq!(of_version(&sim.live(&job), 2), 1, "paused: no next batch");

    // Past the deadline, a report of it changes nothing while paused.
    sim.advance(60_000);
    deadline_seen(&mut sim, &job);
    let d = deployment(&sim, &job);
    assert_eq!(d.state, DeploymentState::Paused);
    // The pause is state: a replica restored from a snapshot holds it too.
    let bytes = aigrid_consensus::state_machine::StateMachine::snapshot(&sim.state).unwrap();
    let mut restored = aigrid_scheduler::state::ClusterState::default();
    aigrid_consensus::state_machine::StateMachine::restore(&mut restored, &bytes).unwrap();
    assert_eq!(
        restored.deployment_of(&job).unwrap().state,
        DeploymentState::Paused
    );

    steer(&mut sim, &job, DeploymentAction::Resume).unwrap();
    sim.settle();
    sim.run_all();
    assert_eq!(of_version(&sim.live(&job), 2), 2, "resumed: the next batch");
    // Nothing turns healthy for the progress deadline: the rollout fails, and
    // without auto_revert what was replaced stays.
    sim.advance(21_000);
    deadline_seen(&mut sim, &job);
    let d = deployment(&sim, &job);
    assert_eq!(d.state, DeploymentState::Failed, "{d:?}");
    assert!(d.description.contains("progress deadline"));
    sim.settle();
    let live = sim.live(&job);
    assert_eq!((of_version(&live, 1), of_version(&live, 2)), (1, 2));
}

#[test]
fn an_abort_runs_the_last_successful_version_again() {
    let update = json!({"max_parallel": 2, "min_healthy_time": "1s", "healthy_deadline": "10s"});
    let (mut sim, job) = running_v1(update.clone());
    sim.submit("web", service("/bin/v2", 3, update));
    sim.settle();
    sim.run_all();
    assert_eq!(of_version(&sim.live(&job), 2), 2);
    let out = steer(&mut sim, &job, DeploymentAction::Abort).unwrap();
    let Applied::DeploymentChanged(Some(d)) = out else {
        panic!("{out:?}")
    };
    assert_eq!(
        (d.state, d.reverted_to),
        (DeploymentState::Reverted, Some(3))
    );
    // A second word on the finished rollout is refused.
    assert!(steer(&mut sim, &job, DeploymentAction::Pause).is_err());
    for _ in 0..3 {
        sim.settle();
        sim.run_all();
    }
    let live = sim.live(&job);
    assert_eq!(
        command_of(&live, &sim, &job),
        vec!["/bin/v1"; 3],
        "{live:?}"
    );
}

#[test]
fn a_change_of_count_or_policy_keeps_the_running_instances() {
    let (mut sim, job) = running_v1(json!({"max_parallel": 1}));
    let before: Vec<AllocId> = sim.live(&job).into_iter().map(|a| a.id).collect();
    sim.submit("web", service("/bin/v1", 4, json!({"max_parallel": 3})));
    sim.settle();
    let live = sim.live(&job);
    assert_eq!(live.len(), 4);
    assert!(before.iter().all(|id| live.iter().any(|a| &a.id == id)));
    assert!(live.iter().all(|a| a.job_version == 2));
}
