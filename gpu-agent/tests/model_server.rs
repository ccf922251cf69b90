//! A `model-server` allocation runs as the agent's own binary in its `serve` role:
//! the runner turns it into an `exec` task with the model, the server, the port the
//! control plane assigned it, the cache and the device, and reports the endpoint it
//! serves at, the same through in-place restarts and agent restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aigrid_agent::driver::{Driver, ExecDriver};
use aigrid_agent::runner::{ModelServerLaunch, Runner, RunnerConfig, SupervisorLaunch};
use aigrid_agent::testkit::ScriptedDriver;
use aigrid_api::{AllocState, AllocationReport, Assignment};

const DIGEST: &str = "5e1f0c2b9a8d7e6f5e1f0c2b9a8d7e6f5e1f0c2b9a8d7e6f5e1f0c2b9a8d7e6f";
const SERVER: &str = "http://127.0.0.1:7700";

/// A `model-server` assignment on the assigned `port`.
fn assignment(id: &str, desired: &str, gpus: &[&str], port: u16) -> Assignment {
    let task = serde_json::json!({"driver": "model-server", "model": DIGEST});
    let mut assignment = aigrid_agent::testkit::assignment(id, desired, gpus, task);
    assignment.allocation.port = Some(port);
    assignment
}

/// A port nothing listens on right now: the system's pick, let go.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(data_dir: &Path, supervisor: SupervisorLaunch) -> RunnerConfig {
    let mut config = RunnerConfig::new(data_dir.to_owned(), supervisor);
    config.model_server = ModelServerLaunch {
        program: PathBuf::from("/opt/aigrid/bin/aigrid"),
        args: vec!["serve".into()],
    };
    config
}

async fn settle(runner: &Runner, done: impl Fn(&AllocationReport) -> bool) -> AllocationReport {
    for _ in 0..1000 {
        if let Some(report) = runner.reports().into_iter().next() {
            if done(&report) {
                return report;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never settled: {:?}", runner.reports());
}

/// Waits until the report of allocation `id` satisfies `done`.
async fn settle_one(
    runner: &Runner,
    id: &str,
    done: impl Fn(&AllocationReport) -> bool,
) -> AllocationReport {
    for _ in 0..1000 {
        let found = runner.reports().into_iter().find(|r| r.id.as_str() == id);
        if let Some(report) = found.filter(|r| done(r)) {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never settled: {:?}", runner.reports());
}

/// An agent restarted on `data_dir` finds model server `m-1` (on `gpus`) still
/// running and reports it at `endpoint` before any apply; told to stop it, it
/// reports it stopped, still at `endpoint`.
async fn reattach_and_stop(
    data_dir: &Path,
    launch: SupervisorLaunch,
    driver: Arc<dyn Driver>,
    gpus: &[&str],
    endpoint: &str,
) {
    let again = Runner::open(config(data_dir, launch), driver)
        .await
        .unwrap();
    let reports = again.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].state, AllocState::Running);
    assert_eq!(reports[0].endpoint.as_deref(), Some(endpoint));
    again.apply(&[assignment("m-1", "stop", gpus, port_of(endpoint))]);
    let stopped = settle(&again, |r| r.state == AllocState::Stopped).await;
    assert_eq!(stopped.endpoint.as_deref(), Some(endpoint));
    again.shutdown().await;
}

/// The argv a model server of `port` on the GPU (or not) should get.
fn expected_args(data_dir: &Path, port: u16, device: &str) -> Vec<String> {
    [
        "serve",
        "--model",
        DIGEST,
        "--server",
        SERVER,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--cache-dir",
        &data_dir.join("model-cache").to_string_lossy(),
        "--device",
        device,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn port_of(endpoint: &str) -> u16 {
    let port = endpoint
        .strip_prefix("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("not a loopback endpoint: {endpoint}"));
    port.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_model_server_runs_the_serve_role_and_keeps_its_endpoint_through_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // The first run exits with code 1; later ones run until stopped.
    let driver = Arc::new(ScriptedDriver::new([1]));
    let launch = SupervisorLaunch {
        program: "/opt/aigrid/bin/aigrid".into(),
        args: vec!["supervise".into()],
    };
    let runner = Runner::open(config(dir.path(), launch.clone()), driver.clone())
        .await
        .unwrap();
    runner.set_control_server(SERVER);
    let port = free_port();
    runner.apply(&[assignment("m-1", "run", &["GPU-7f"], port)]);

    // The first run exits with code 1 and is restarted in place, on the same port.
    let report = settle(&runner, |r| {
        r.state == AllocState::Running && r.restarts == 1
    })
    .await;
    let endpoint = report.endpoint.clone().expect("an endpoint is reported");
    assert_eq!(
        endpoint,
        format!("http://127.0.0.1:{port}"),
        "the assigned port"
    );
    let started = driver.started();
    assert_eq!(started.len(), 2);
    for ctx in &started {
        assert_eq!(ctx.task.command, "/opt/aigrid/bin/aigrid");
        assert_eq!(ctx.task.args, expected_args(dir.path(), port, "cuda:0"));
        assert_eq!(ctx.endpoint.as_deref(), Some(endpoint.as_str()));
        // Its GPU is the only one it sees; the exec machinery sets that up.
        assert_eq!(ctx.alloc.gpus, ["GPU-7f"]);
    }
    assert_eq!((started[0].restarts, started[1].restarts), (0, 1));
    runner.shutdown().await;

    // A restarted agent reattaches and reports the same endpoint before any apply.
    reattach_and_stop(dir.path(), launch, driver, &["GPU-7f"], &endpoint).await;
}

#[tokio::test]
async fn a_cpu_model_server_without_a_known_server_fails_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let driver = Arc::new(ScriptedDriver::new([]));
    let launch = SupervisorLaunch {
        program: "/nonexistent".into(),
        args: vec![],
    };
    let runner = Runner::open(config(dir.path(), launch), driver.clone())
        .await
        .unwrap();
    runner.apply(&[assignment("m-1", "run", &[], free_port())]);
    let failed = settle(&runner, |r| r.state == AllocState::Failed).await;
    assert!(
        failed
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("control-plane server")),
        "{failed:?}"
    );
    assert!(driver.started().is_empty());

    runner.set_control_server(SERVER);
    let port = free_port();
    runner.apply(&[assignment("m-2", "run", &[], port)]);
    let report = settle_one(&runner, "m-2", |r| r.state == AllocState::Running).await;
    assert_eq!(port_of(report.endpoint.as_deref().unwrap()), port);
    let started = driver.started();
    assert_eq!(started[0].task.args, expected_args(dir.path(), port, "cpu"));
    runner.shutdown().await;
}

#[tokio::test]
async fn a_model_server_whose_assigned_port_is_taken_fails_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let driver = Arc::new(ScriptedDriver::new([]));
    let launch = SupervisorLaunch {
        program: "/nonexistent".into(),
        args: vec![],
    };
    let runner = Runner::open(config(dir.path(), launch), driver.clone())
        .await
        .unwrap();
    runner.set_control_server(SERVER);
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    runner.apply(&[assignment("m-1", "run", &[], port)]);
    let failed = settle(&runner, |r| r.state == AllocState::Failed).await;
    let reason = failed.reason.unwrap_or_default();
    assert!(reason.contains(&format!("port {port}")), "{reason}");
    assert!(driver.started().is_empty(), "never started elsewhere");
    // Without an assigned port it does not pick one of its own either.
    let mut portless = assignment("m-2", "run", &[], port);
    portless.allocation.port = None;
    runner.apply(&[portless]);
    let failed = settle_one(&runner, "m-2", |r| r.state == AllocState::Failed).await;
    assert!(failed.reason.unwrap_or_default().contains("no port"));
    assert!(driver.started().is_empty());
    runner.shutdown().await;
}

/// A stand-in for `aigrid supervise <alloc_dir>`: records itself as both supervisor
/// and workload the way the real one does, then sleeps until it is stopped. What it
/// was asked to run stays in `task.json`, written by the exec driver.
const FAKE_SUPERVISOR: &str = r#"dir="$1"
start=$(cut -d' ' -f22 /proc/$$/stat)
printf '{"pid":%s,"start_time":%s}' $$ "$start" > "$dir/supervisor.json"
printf '{"process":{"pid":%s,"start_time":%s},"limits":"not_enforced"}' $$ "$start" > "$dir/.w"
mv "$dir/.w" "$dir/workload.json"
exec sleep 600
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exec_driver_keeps_a_model_servers_argv_and_endpoint_across_agent_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let launch = SupervisorLaunch {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), FAKE_SUPERVISOR.into(), "fake-supervise".into()],
    };
    let runner = Runner::open(
        config(dir.path(), launch.clone()),
        Arc::new(ExecDriver::new()),
    )
    .await
    .unwrap();
    runner.set_control_server(SERVER);
    let port = free_port();
    runner.apply(&[assignment("m-1", "run", &[], port)]);
    let report = settle(&runner, |r| r.state == AllocState::Running).await;
    let endpoint = report.endpoint.clone().expect("an endpoint is reported");
    assert_eq!(port_of(&endpoint), port, "the assigned port");

    // What the supervisor was told to run: this binary's serve role, CPU only.
    let task_file = dir.path().join("allocs/m-1/task.json");
    let task: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&task_file).unwrap()).unwrap();
    assert_eq!(task["command"], "/opt/aigrid/bin/aigrid");
    let args: Vec<String> = serde_json::from_value(task["args"].clone()).unwrap();
    assert_eq!(args, expected_args(dir.path(), port, "cpu"));
    assert_eq!(task["endpoint"], endpoint.as_str());
    assert_eq!(task["env"]["CUDA_VISIBLE_DEVICES"], "");
    runner.shutdown().await;

    // The agent restarts: the model server is found still running, at its endpoint.
    let driver = Arc::new(ExecDriver::new());
    reattach_and_stop(dir.path(), launch, driver, &[], &endpoint).await;
}
