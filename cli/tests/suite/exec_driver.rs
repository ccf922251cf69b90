//! The exec driver end to end: real workloads under real `aigrid supervise`
//! processes, driven through `aigrid_agent::runner::Runner` as the agent drives it.
//!
//! Every test works in its own temporary directory and, through [`Harness`]'s drop,
//! kills every process whose command line or working directory lies under it, so a
//! failing test leaves nothing running.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_agent::driver::ExecDriver;
use aigrid_agent::runner::{Runner, RunnerConfig, SupervisorLaunch};
use aigrid_api::{AllocState, AllocationReport, Assignment};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

struct Harness {
    dir: tempfile::TempDir,
    log_max_bytes: u64,
    log_max_files: u32,
}

impl Harness {
    fn new() -> Self {
        Harness {
            dir: tempfile::tempdir().unwrap(),
            log_max_bytes: 10 * 1024 * 1024,
            log_max_files: 5,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn alloc_dir(&self, id: &str) -> PathBuf {
        self.data_dir().join("allocs").join(id)
    }

    fn local(&self, id: &str) -> PathBuf {
        self.alloc_dir(id).join("local")
    }

    async fn open(&self) -> Runner {
        let mut config = RunnerConfig::new(
            self.data_dir(),
            SupervisorLaunch {
                program: env!("CARGO_BIN_EXE_aigrid").into(),
                args: vec!["supervise".into()],
            },
        );
        config.log_max_bytes = self.log_max_bytes;
        config.log_max_files = self.log_max_files;
        Runner::open(config, Arc::new(ExecDriver::new()))
            .await
            .unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let root = self.dir.path().to_string_lossy().into_owned();
        for _ in 0..3 {
            for pid in pids() {
                let cmdline = cmdline(pid);
                let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
                if cmdline.contains(&root) || cwd.starts_with(&root) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid| *pid != me)
        .collect()
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Live processes whose command line contains `marker`, less the children such a
/// process forked and has not yet replaced by what they run (a shell's `sleep`
/// between its fork and its exec carries the shell's command line).
fn count_processes(marker: &str) -> usize {
    pids()
        .into_iter()
        .filter(|pid| cmdline(*pid).contains(marker))
        .filter(|pid| !parent(*pid).is_some_and(|ppid| cmdline(ppid).contains(marker)))
        .count()
}

/// The parent of `pid`, from `/proc/PID/status`.
fn parent(pid: i32) -> Option<i32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

fn assignment(id: &str, gpus: &[&str], desired: &str, task: Value) -> Assignment {
    serde_json::from_value(json!({
        "allocation": {
            "id": id, "job_id": "job-1", "job_version": 1, "node_id": "node-1",
            "group": "workers", "index": 0,
            "resources": {"cpu_millis": 500, "memory_mib": 128},
            "gpus": gpus, "state": "pending", "desired": desired,
            "created_at": 0, "updated_at": 0
        },
        "task": task,
    }))
    .unwrap()
}

/// An `exec` task running `script` with `/bin/sh -c`; `extra` adds task fields.
fn sh(script: &str, extra: Value) -> Value {
    let mut task = json!({
        "driver": "exec", "command": "/bin/sh", "args": ["-c", script],
        "kill_timeout_ms": 2000,
    });
    task.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    task
}

async fn wait_for(
    runner: &Runner,
    id: &str,
    what: &str,
    pred: impl Fn(&AllocationReport) -> bool,
) -> AllocationReport {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let report = runner.reports().into_iter().find(|r| r.id.as_str() == id);
        if let Some(report) = &report {
            if pred(report) {
                return report.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {what}: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_state(runner: &Runner, id: &str, state: AllocState) -> AllocationReport {
    wait_for(runner, id, state.as_str(), |r| r.state == state).await
}

async fn wait_file(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        if let Ok(text) = fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `path` exists.
async fn wait_exists(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(8);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_see_their_own_gpus_and_ship_output() {
    let h = Harness::new();
    let runner = h.open().await;
    let script = "env > env.txt; echo $CUDA_VISIBLE_DEVICES > seen; \
                  echo hello-from-$AIGRID_ALLOC_ID; echo to-stderr >&2; sleep 60";
    let run = [
        assignment("alloc-a", &["GPU-a"], "run", sh(script, json!({}))),
        assignment("alloc-b", &["GPU-b"], "run", sh(script, json!({}))),
    ];
    runner.apply(&run);
    for (id, gpu) in [("alloc-a", "GPU-a"), ("alloc-b", "GPU-b")] {
        let report = wait_state(&runner, id, AllocState::Running).await;
        assert!(report.limits.is_some());
        assert_eq!(
            wait_file(&h.local(id).join("seen")).await,
            format!("{gpu}\n")
        );
        let env = fs::read_to_string(h.local(id).join("env.txt")).unwrap();
        assert!(env.contains(&format!("AIGRID_ALLOC_ID={id}\n")), "{env}");
        assert!(
            env.contains(&format!("NVIDIA_VISIBLE_DEVICES={gpu}\n")),
            "{env}"
        );
        let allowed = [
            "AIGRID_ALLOC_ID",
            "AIGRID_JOB_ID",
            "AIGRID_GROUP",
            "AIGRID_ALLOC_INDEX",
            "AIGRID_TASK_DIR",
            // The allocation's own secrets, not an agent setting.
            "AIGRID_SECRETS_DIR",
        ];
        for line in env.lines().filter(|l| l.starts_with("AIGRID_")) {
            let name = line.split('=').next().unwrap();
            assert!(allowed.contains(&name), "agent setting leaked: {line}");
        }
    }

    let deadline = Instant::now() + Duration::from_secs(8);
    let tails = loop {
        let tails = runner.log_tails(10);
        let complete = tails.len() == 2
            && tails
                .iter()
                .all(|t| t.stdout.contains("hello-from-") && t.stderr == "to-stderr\n");
        if complete {
            break tails;
        }
        assert!(Instant::now() < deadline, "no log tails: {tails:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(tails[0].stdout, "hello-from-alloc-a\n");
    assert_eq!(tails[1].stdout, "hello-from-alloc-b\n");
    runner.mark_shipped(&tails);
    assert!(runner.log_tails(10).is_empty(), "nothing new to ship");

    runner.apply(&[]);
    wait_state(&runner, "alloc-a", AllocState::Stopped).await;
    wait_state(&runner, "alloc-b", AllocState::Stopped).await;
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_allocation_is_kept_until_the_end_of_its_output_is_shipped() {
    let h = Harness::new();
    let runner = h.open().await;
    let run = [assignment(
        "alloc-short",
        &[],
        "run",
        sh("echo the-last-words", json!({})),
    )];
    runner.apply(&run);
    wait_state(&runner, "alloc-short", AllocState::Complete).await;
    // The control plane drops the finished allocation before any tail of its
    // output went out: it stays, output and all.
    runner.apply(&[]);
    runner.apply(&[]);
    runner.apply(&[]);
    assert_eq!(
        runner.reports().len(),
        1,
        "forgotten before its output shipped"
    );
    assert!(h.alloc_dir("alloc-short").exists());
    let tails = runner.log_tails(10);
    assert_eq!(tails.len(), 1);
    assert_eq!(tails[0].stdout, "the-last-words\n");
    runner.mark_shipped(&tails);
    // Shipped: the next absence forgets it and removes its directory.
    runner.apply(&[]);
    assert!(runner.reports().is_empty());
    let deadline = Instant::now() + Duration::from_secs(8);
    while h.alloc_dir("alloc-short").exists() {
        assert!(Instant::now() < deadline, "the directory was never removed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_restarts_then_fails() {
    let h = Harness::new();
    let runner = h.open().await;
    let policy = json!({"restart": {"attempts": 2, "delay_ms": 100}});
    runner.apply(&[
        assignment(
            "fails",
            &[],
            "run",
            sh("echo run >> runs; exit 3", policy.clone()),
        ),
        assignment(
            "succeeds",
            &[],
            "run",
            sh("echo run >> runs; exit 0", policy),
        ),
        assignment(
            "never",
            &[],
            "run",
            sh(
                "echo run >> runs; exit 3",
                json!({"restart": {"mode": "never"}}),
            ),
        ),
    ]);

    let failed = wait_state(&runner, "fails", AllocState::Failed).await;
    assert_eq!(failed.restarts, 2);
    let reason = failed.reason.unwrap();
    assert!(reason.contains("code 3"), "{reason}");
    assert_eq!(reason, "exited with code 3 after 2 restarts");
    assert_eq!(
        fs::read_to_string(h.local("fails").join("runs")).unwrap(),
        "run\n".repeat(3)
    );

    let complete = wait_state(&runner, "succeeds", AllocState::Complete).await;
    assert_eq!((complete.restarts, complete.reason), (0, None));
    assert_eq!(
        fs::read_to_string(h.local("succeeds").join("runs")).unwrap(),
        "run\n"
    );

    let never = wait_state(&runner, "never", AllocState::Failed).await;
    assert_eq!(never.restarts, 0);
    assert_eq!(never.reason.as_deref(), Some("exited with code 3"));
    assert_eq!(
        fs::read_to_string(h.local("never").join("runs")).unwrap(),
        "run\n"
    );
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_is_graceful_then_forced() {
    let h = Harness::new();
    let runner = h.open().await;
    // A grace period far beyond any wait below: it stops only by its own hand.
    let polite = sh(
        "trap 'echo got-term > term; exit 0' TERM; echo $$ > pid; \
         while true; do sleep 0.1; done",
        json!({"kill_timeout_ms": 3_600_000}),
    );
    let stubborn = sh(
        "trap '' TERM; echo $$ > pid; while true; do sleep 0.1; done",
        json!({"kill_timeout_ms": 1500}),
    );
    runner.apply(&[
        assignment("polite", &[], "run", polite.clone()),
        assignment("stubborn", &[], "run", stubborn.clone()),
    ]);
    for id in ["polite", "stubborn"] {
        wait_state(&runner, id, AllocState::Running).await;
        wait_file(&h.local(id).join("pid")).await;
    }
    let stubborn_pid: i32 = fs::read_to_string(h.local("stubborn").join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let asked = Instant::now();
    runner.apply(&[
        assignment("polite", &[], "stop", polite),
        assignment("stubborn", &[], "stop", stubborn),
    ]);
    // Stopped, with its TERM handler's mark: it left on TERM, long before its
    // hour of grace could have ended in a SIGKILL.
    wait_state(&runner, "polite", AllocState::Stopped).await;
    assert_eq!(
        fs::read_to_string(h.local("polite").join("term")).unwrap(),
        "got-term\n"
    );

    wait_state(&runner, "stubborn", AllocState::Stopped).await;
    // A lower bound the runner promises (load can only lengthen it): no SIGKILL
    // before the grace period is over.
    assert!(
        asked.elapsed() >= Duration::from_millis(1500),
        "killed before the grace period: {:?}",
        asked.elapsed()
    );
    assert!(
        !cmdline(stubborn_pid).contains("trap"),
        "the TERM-ignoring workload survived"
    );
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_runner_reattaches_instead_of_starting_twice() {
    let h = Harness::new();
    let marker = format!("aigrid-reattach-{:016x}", rand::random::<u64>());
    let mut long = sh(
        "echo $$ > pid; while true; do sleep 0.1; done",
        json!({"restart": {"mode": "never"}}),
    );
    long["args"].as_array_mut().unwrap().push(json!(marker));
    let short = sh(
        "while [ ! -f go ]; do sleep 0.05; done; exit 7",
        json!({"restart": {"mode": "never"}}),
    );
    let run = [
        assignment("long", &[], "run", long.clone()),
        assignment("short", &[], "run", short),
    ];

    let first = h.open().await;
    first.apply(&run);
    wait_state(&first, "long", AllocState::Running).await;
    wait_state(&first, "short", AllocState::Running).await;
    let pid = wait_file(&h.local("long").join("pid")).await;
    assert_eq!(count_processes(&marker), 1);
    // The agent goes away; its workloads do not.
    first.shutdown().await;
    drop(first);
    // One of them ends while no agent watches: its supervisor records the exit.
    fs::write(h.local("short").join("go"), "").unwrap();
    wait_exists(&h.alloc_dir("short").join("exit.json")).await;
    assert_eq!(count_processes(&marker), 1);

    let second = h.open().await;
    let long_report = wait_state(&second, "long", AllocState::Running).await;
    assert_eq!(long_report.restarts, 0);
    let short_report = wait_state(&second, "short", AllocState::Failed).await;
    assert_eq!(short_report.reason.as_deref(), Some("exited with code 7"));
    // Applied again beside a new allocation: once the newcomer runs, whatever that
    // apply started is running too, and a duplicate of `long` would be among it.
    let canary = assignment("canary", &[], "run", sh("sleep 600", json!({})));
    let mut again = run.to_vec();
    again.push(canary.clone());
    second.apply(&again);
    wait_state(&second, "canary", AllocState::Running).await;
    assert_eq!(count_processes(&marker), 1, "started a duplicate");
    assert_eq!(
        fs::read_to_string(h.local("long").join("pid")).unwrap(),
        pid
    );
    wait_state(&second, "long", AllocState::Running).await;

    let mut canary = canary;
    canary.allocation.desired = aigrid_api::DesiredState::Stop;
    second.apply(&[assignment("long", &[], "stop", long), canary]);
    wait_state(&second, "long", AllocState::Stopped).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_processes(&marker) > 0 {
        assert!(Instant::now() < deadline, "the workload outlived its stop");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_stopped_with_their_agent_start_again_only_if_still_wanted() {
    let h = Harness::new();
    // Each leaves on TERM with code 0, as a model server does: the exit alone
    // cannot tell the stop from the workload finishing.
    let polite = sh(
        "trap 'exit 0' TERM; echo $$ >> starts; while true; do sleep 0.1; done",
        json!({"restart": {"mode": "never"}}),
    );
    let done = sh(
        "while [ ! -f go ]; do sleep 0.05; done; exit 0",
        json!({"restart": {"mode": "never"}}),
    );
    let stopped = ["wanted", "dropped", "unwanted"];
    let mut run: Vec<Assignment> = stopped
        .iter()
        .map(|id| assignment(id, &[], "run", polite.clone()))
        .collect();
    run.push(assignment("done", &[], "run", done));
    let starts = |id: &str| {
        fs::read_to_string(h.local(id).join("starts"))
            .unwrap_or_default()
            .lines()
            .count()
    };

    let first = h.open().await;
    first.apply(&run);
    for id in stopped {
        wait_state(&first, id, AllocState::Running).await;
        wait_file(&h.local(id).join("starts")).await;
    }
    fs::write(h.local("done").join("go"), "").unwrap();
    wait_state(&first, "done", AllocState::Complete).await;
    // As an agent stops its workloads at its end (`aigrid up` on SIGTERM).
    first.apply(&[]);
    for id in stopped {
        wait_state(&first, id, AllocState::Stopped).await;
    }
    first.shutdown().await;
    drop(first);

    let second = h.open().await;
    // Before the control plane answers: pending, not complete, and not started.
    for id in stopped {
        let report = wait_state(&second, id, AllocState::Pending).await;
        assert!(
            report
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("stopped when"),
            "{report:?}"
        );
    }
    wait_state(&second, "done", AllocState::Complete).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in stopped {
        assert_eq!(
            starts(id),
            1,
            "{id} started before the control plane said so"
        );
    }

    // Still wanted: runs again in place. Wanted stopped, or no longer listed:
    // stopped, never started. Finished by itself: stays complete.
    let mut answer = vec![run[0].clone(), run[3].clone()];
    answer.push(assignment("unwanted", &[], "stop", polite.clone()));
    second.apply(&answer);
    let report = wait_state(&second, "wanted", AllocState::Running).await;
    assert_eq!(report.restarts, 0);
    wait_for(&second, "wanted", "started again", |_| {
        starts("wanted") == 2
    })
    .await;
    wait_state(&second, "dropped", AllocState::Stopped).await;
    wait_state(&second, "unwanted", AllocState::Stopped).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(starts("dropped"), 1);
    assert_eq!(starts("unwanted"), 1);
    assert_eq!(
        second
            .reports()
            .iter()
            .find(|r| r.id.as_str() == "done")
            .unwrap()
            .state,
        AllocState::Complete
    );

    // Stopped by the control plane and found again: never started unasked.
    let stop = [assignment("wanted", &[], "stop", polite.clone())];
    second.apply(&stop);
    wait_state(&second, "wanted", AllocState::Stopped).await;
    second.shutdown().await;
    drop(second);
    let third = h.open().await;
    wait_state(&third, "wanted", AllocState::Pending).await;
    third.apply(&stop);
    wait_state(&third, "wanted", AllocState::Stopped).await;
    assert_eq!(starts("wanted"), 2);
    third.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_artifacts_never_run() {
    let h = Harness::new();
    let content = b"weights-v1: 0123456789\n".to_vec();
    let good = h.dir.path().join("weights.txt");
    fs::write(&good, &content).unwrap();
    let digest = aigrid_agent::artifact::hash_file(&good)
        .unwrap()
        .0
        .to_hex()
        .to_string();
    let mut flipped = content.clone();
    flipped[5] ^= 0x04;
    let bad = h.dir.path().join("tampered.txt");
    fs::write(&bad, &flipped).unwrap();

    let runner = h.open().await;
    let never = json!({"mode": "never"});
    runner.apply(&[
        assignment(
            "tampered",
            &[],
            "run",
            sh(
                "touch ran",
                json!({"restart": never, "artifacts": [
                    {"source": format!("file://{}", bad.display()), "blake3": digest}
                ]}),
            ),
        ),
        assignment(
            "verified",
            &[],
            "run",
            sh(
                "cat weights.txt > copy",
                json!({"restart": never, "artifacts": [
                    {"source": good.to_str().unwrap(), "blake3": digest}
                ]}),
            ),
        ),
    ]);

    let failed = wait_state(&runner, "tampered", AllocState::Failed).await;
    let reason = failed.reason.unwrap();
    assert!(reason.starts_with("digest_mismatch"), "{reason}");
    assert!(reason.contains(&digest), "{reason}");
    assert!(!reason.contains('\n'));
    assert!(!h.local("tampered").join("ran").exists(), "the command ran");
    assert!(!h.local("tampered").join("tampered.txt").exists());

    wait_state(&runner, "verified", AllocState::Complete).await;
    assert_eq!(fs::read(h.local("verified").join("copy")).unwrap(), content);
    assert_eq!(
        fs::read(h.local("verified").join("weights.txt")).unwrap(),
        content
    );
    runner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_rotate_and_tails_span_rotations() {
    let mut h = Harness::new();
    h.log_max_bytes = 1024;
    h.log_max_files = 2;
    let runner = h.open().await;
    let script =
        "i=0; while [ $i -lt 200 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done";
    runner.apply(&[assignment(
        "chatty",
        &[],
        "run",
        sh(script, json!({"restart": {"mode": "never"}})),
    )]);
    wait_state(&runner, "chatty", AllocState::Complete).await;

    let logs = h.data_dir().join("allocs/chatty/logs");
    let size = |name: &str| fs::metadata(logs.join(name)).map(|m| m.len()).ok();
    assert!(size("stdout.log").unwrap() <= 1024);
    assert_eq!(size("stdout.log.1"), Some(1024));
    assert_eq!(size("stdout.log.2"), Some(1024));
    assert_eq!(size("stdout.log.3"), None);

    let tails = runner.log_tails(10);
    assert_eq!(tails.len(), 1);
    let stdout = &tails[0].stdout;
    assert!(
        stdout.ends_with("line-199-xxxxxxxxxxxxxxxxxxxx\n"),
        "{stdout}"
    );
    let expected = size("stdout.log").unwrap() + 2048;
    assert_eq!(
        stdout.len() as u64,
        expected,
        "current plus both rotated files"
    );
    runner.shutdown().await;
}
