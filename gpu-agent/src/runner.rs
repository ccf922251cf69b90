//! The allocation runner: makes what runs on this node match what the control
//! plane assigned, and reports back what does run.
//!
//! Each allocation the runner knows has one lifecycle task: prepare (artifacts),
//! start, watch, restart by policy, stop on request. Drivers do the work of one run;
//! the runner owns the states the control plane sees:
//!
//! ```text
//! pending --start--> running --exit 0--------------------> complete
//!    |                  |  \--exit!=0, restart allowed--> pending (delay) --> running
//!    |                  |  \--exit!=0, no restart-------> failed
//!    |                  \--stop requested---------------> stopped
//!    \--artifact refused / cannot start-----------------> failed
//! ```
//!
//! Workloads outlive the agent: [`Runner::shutdown`] only stops watching, and the
//! next [`Runner::open`] reattaches to what still runs. A reattached allocation does
//! nothing on its own (no restart, no stop) until the first [`Runner::apply`] says
//! whether it is still wanted; nor does one an agent stopped (`aigrid up` stops
//! its workloads at its end), found pending and started again in place if still
//! wanted. The lifecycle task itself is in [`lifecycle`].
//!
//! An allocation is forgotten (its directory removed) once it is terminal,
//! absent from two consecutive `apply` calls, and its output shipped: the first
//! absence may be the control plane dropping it before the final report reached
//! it, and the heartbeat between the two calls carries that report; the end of its
//! output goes out with a later heartbeat's log tails, which are sent less often.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use aigrid_api::allocation::MAX_REASON_LEN;
use aigrid_api::{
    AllocId, AllocState, AllocationReport, Assignment, DesiredState, LimitsEnforcement, LogTail,
    NodeProtections, TaskSpec,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::config::{
    RunnerConfig, SupervisorLaunch, DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_MAX_FILES,
};
use crate::driver::{Driver, DriverError, LogMark, RecoveredStatus, TaskContext};
pub use crate::model_server::ModelServerLaunch;
use crate::model_server::{self, ServeSite};
use crate::sandbox::Grants;

mod lifecycle;
use lifecycle::{lifecycle, outcome, Start};

/// Why a runner could not open.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The allocations an earlier agent started could not be looked for.
    #[error("cannot recover allocations: {0}")]
    Recover(#[from] DriverError),
}

/// What the control plane last said about an allocation, as its lifecycle sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    /// Reattached after an agent restart; no `apply` has spoken yet.
    Unconfirmed,
    /// Keep it running.
    Run,
    /// Stop it. Never taken back.
    Stop,
}

struct Entry {
    report: AllocationReport,
    control: watch::Sender<Control>,
    task: Option<JoinHandle<()>>,
    /// Terminal and absent from the last `apply`.
    absent: bool,
    /// The log mark of the tail last handed out, and of the one last shipped.
    offered: Option<LogMark>,
    shipped: Option<LogMark>,
}

impl Entry {
    fn new(report: AllocationReport, control: Control) -> Self {
        Entry {
            report,
            control: watch::Sender::new(control),
            task: None,
            absent: false,
            offered: None,
            shipped: None,
        }
    }
}

struct Inner {
    config: Arc<RunnerConfig>,
    driver: Arc<dyn Driver>,
    limits: (LimitsEnforcement, Option<String>),
    protections: Option<NodeProtections>,
    entries: Mutex<BTreeMap<AllocId, Entry>>,
    changes: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    /// Where `log_tails` resumes, so every allocation's output gets shipped in turn.
    tail_cursor: Mutex<Option<AllocId>>,
    /// What model servers started from now on are told about the control plane
    /// and this node.
    site: Mutex<ServeSite>,
    runtime: tokio::runtime::Handle,
}

/// Runs this node's allocations through a [`Driver`]. Cheap to clone; clones share
/// one runner.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

impl Runner {
    /// Opens the runner: probes limits and finds allocations an earlier agent
    /// started. Live ones are reattached (not started again); finished ones report
    /// their recorded exit; ones whose supervisor vanished are failed; ones an
    /// agent stopped (as `aigrid up` does at its end) wait, pending, for the first
    /// [`Runner::apply`] and start again if the control plane still wants them.
    pub async fn open(
        config: RunnerConfig,
        driver: Arc<dyn Driver>,
    ) -> Result<Runner, RunnerError> {
        let config = Arc::new(config);
        let limits = driver.limits();
        let protections = driver.protections(&config);
        let recovered = driver.recover(&config).await?;
        let runner = Runner {
            inner: Arc::new(Inner {
                config,
                driver,
                limits,
                protections,
                entries: Mutex::new(BTreeMap::new()),
                changes: watch::Sender::new(0),
                shutdown: watch::Sender::new(false),
                tail_cursor: Mutex::new(None),
                site: Mutex::new(ServeSite::default()),
                runtime: tokio::runtime::Handle::current(),
            }),
        };
        let mut entries = runner.inner.lock();
        for found in recovered {
            let ctx = found.ctx;
            let id = ctx.alloc.id.clone();
            let mut report = AllocationReport::new(id.clone(), AllocState::Running);
            report.restarts = ctx.restarts;
            report.endpoint = ctx.endpoint.clone();
            match found.status {
                RecoveredStatus::Running(handle) => {
                    tracing::info!(alloc = %id, "reattached to a running allocation");
                    report.limits = Some(handle.limits());
                    let mut entry = Entry::new(report, Control::Unconfirmed);
                    entry.task = Some(runner.spawn(ctx, &entry, Start::Attached(handle)));
                    entries.insert(id, entry);
                }
                RecoveredStatus::Stopped => {
                    tracing::info!(alloc = %id, "found an allocation stopped by an earlier agent");
                    report.state = AllocState::Pending;
                    report.reason = Some(RESUME_REASON.into());
                    let mut entry = Entry::new(report, Control::Unconfirmed);
                    entry.task = Some(runner.spawn(ctx, &entry, Start::Stopped));
                    entries.insert(id, entry);
                }
                RecoveredStatus::Exited(exit) => {
                    tracing::info!(alloc = %id, exit = ?exit, "found a finished allocation");
                    let (state, reason) = outcome(&exit, ctx.restarts);
                    report.state = state;
                    report.reason = reason;
                    entries.insert(id, Entry::new(report, Control::Unconfirmed));
                }
            }
        }
        drop(entries);
        Ok(runner)
    }

    /// Whether this node enforces allocations' CPU and memory limits, and why not.
    pub fn limits_enforced(&self) -> (LimitsEnforcement, Option<String>) {
        self.inner.limits.clone()
    }

    /// What keeps this node's workloads from its credentials and from one
    /// another, as the driver found it; `None` for drivers that run no process.
    pub fn protections(&self) -> Option<NodeProtections> {
        self.inner.protections.clone()
    }

    /// Sets the control-plane URL, or comma-separated URLs, model servers started
    /// from now on load their model from (`--server`); the agent passes its
    /// servers, the one that last answered first.
    pub fn set_control_server(&self, url: &str) {
        self.inner.site.lock().expect("site lock").server = Some(url.to_owned());
    }

    /// Sets the cluster CA's certificate (PEM) model servers started from now on
    /// trust, for the control plane and the store's data ports; `None`: the
    /// system's roots.
    pub fn set_cluster_ca(&self, pem: Option<String>) {
        self.inner.site.lock().expect("site lock").ca_pem = pem;
    }

    /// Sets the address the servers reach this node at, as its registration's
    /// answer says: model servers listen there (when it is this machine's) and
    /// report it; `None` (the default) means 127.0.0.1.
    pub fn set_node_address(&self, address: Option<std::net::IpAddr>) {
        self.inner.site.lock().expect("site lock").address = address;
    }

    /// Makes the node match the control plane's view. Returns at once; the work
    /// happens on spawned tasks. Starts wanted `exec` and `model-server`
    /// allocations it does not run (a model server as an `exec` task of this
    /// binary, on a port picked now and kept for the allocation's life), stops
    /// unwanted or vanished ones, and never starts one that comes without a task.
    /// Call it only with the answer of a successful poll: the first call after
    /// [`Runner::open`] decides what reattached allocations do.
    pub fn apply(&self, assignments: &[Assignment]) {
        if *self.inner.shutdown.borrow() {
            return;
        }
        let mut entries = self.inner.lock();
        let mut present = HashSet::with_capacity(assignments.len());
        let mut changed = false;
        for assignment in assignments {
            let alloc = &assignment.allocation;
            present.insert(&alloc.id);
            let want = match alloc.desired {
                DesiredState::Run => Control::Run,
                DesiredState::Stop => Control::Stop,
            };
            if let Some(entry) = entries.get_mut(&alloc.id) {
                entry.absent = false;
                entry.control.send_if_modified(|c| {
                    let update = *c != Control::Stop && *c != want;
                    if update {
                        *c = want;
                    }
                    update
                });
                continue;
            }
            let id = alloc.id.clone();
            let entry = match (alloc.desired, &assignment.task) {
                (DesiredState::Run, Some(task)) => match self.context(alloc, task) {
                    Ok(ctx) => {
                        let mut report = AllocationReport::new(id.clone(), AllocState::Pending);
                        report.endpoint = ctx.endpoint.clone();
                        let mut entry = Entry::new(report, Control::Run);
                        entry.task = Some(self.spawn(ctx, &entry, Start::Fresh));
                        entry
                    }
                    Err(mut reason) => {
                        tracing::warn!(alloc = %id, %reason, "allocation cannot start");
                        truncate_reason(&mut reason);
                        let mut report = AllocationReport::new(id.clone(), AllocState::Failed);
                        report.reason = Some(reason);
                        Entry::new(report, Control::Run)
                    }
                },
                // An allocation of an older job version: kept if it runs, never started.
                (DesiredState::Run, None) => continue,
                (DesiredState::Stop, _) if !alloc.state.is_terminal() => Entry::new(
                    AllocationReport::new(id.clone(), AllocState::Stopped),
                    Control::Stop,
                ),
                (DesiredState::Stop, _) => continue,
            };
            entries.insert(id, entry);
            changed = true;
        }

        let mut forget = Vec::new();
        for (id, entry) in entries.iter_mut() {
            if present.contains(id) {
                continue;
            }
            if !entry.report.state.is_terminal() {
                entry.control.send_if_modified(|c| {
                    let update = *c != Control::Stop;
                    *c = Control::Stop;
                    update
                });
            } else if entry.absent {
                // Output written since the last tail shipped would go with the
                // directory: it waits for the next heartbeat that carries tails.
                let unshipped = self
                    .inner
                    .driver
                    .log_mark(&self.inner.config, id)
                    .is_some_and(|mark| Some(mark) != entry.shipped);
                if !unshipped {
                    forget.push(id.clone());
                }
            } else {
                entry.absent = true;
            }
        }
        for id in forget {
            let Some(entry) = entries.remove(&id) else {
                continue;
            };
            changed = true;
            let inner = self.inner.clone();
            self.inner.runtime.spawn(async move {
                if let Some(task) = entry.task {
                    let _ = task.await;
                }
                inner.driver.destroy(&inner.config, &id).await;
            });
        }
        drop(entries);
        if changed {
            self.inner.bump();
        }
    }

    /// The state of every allocation the runner knows, terminal ones included until
    /// they are forgotten, ordered by id.
    pub fn reports(&self) -> Vec<AllocationReport> {
        self.inner
            .lock()
            .values()
            .map(|e| e.report.clone())
            .collect()
    }

    /// Bumps whenever a report changes, so the agent can heartbeat early.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The output tails of at most `max` allocations whose output grew since it was
    /// last shipped, taking allocations in turn across calls.
    pub fn log_tails(&self, max: usize) -> Vec<LogTail> {
        let inner = &self.inner;
        let candidates: Vec<(AllocId, Option<LogMark>)> = {
            let entries = inner.lock();
            let cursor = inner.tail_cursor.lock().expect("cursor lock").clone();
            let (after, before): (Vec<_>, Vec<_>) = entries
                .iter()
                .map(|(id, e)| (id.clone(), e.shipped))
                .partition(|(id, _)| cursor.as_ref().is_some_and(|c| id > c));
            after.into_iter().chain(before).collect()
        };
        let mut tails = Vec::new();
        let mut offered = Vec::new();
        for (id, shipped) in candidates {
            if tails.len() >= max {
                break;
            }
            let Some(mark) = inner.driver.log_mark(&inner.config, &id) else {
                continue;
            };
            if Some(mark) == shipped {
                continue;
            }
            if let Some(tail) = inner.driver.log_tail(&inner.config, &id) {
                offered.push((id, mark));
                tails.push(tail);
            }
        }
        if let Some((last, _)) = offered.last() {
            *inner.tail_cursor.lock().expect("cursor lock") = Some(last.clone());
        }
        let mut entries = inner.lock();
        for (id, mark) in offered {
            if let Some(entry) = entries.get_mut(&id) {
                entry.offered = Some(mark);
            }
        }
        tails
    }

    /// Marks these tails as shipped; call it once the heartbeat carrying them was
    /// accepted.
    pub fn mark_shipped(&self, tails: &[LogTail]) {
        let mut entries = self.inner.lock();
        for tail in tails {
            if let Some(entry) = entries.get_mut(&tail.id) {
                if entry.offered.is_some() {
                    entry.shipped = entry.offered;
                }
            }
        }
    }

    /// Stops watching. Workloads keep running (an agent restart or upgrade must not
    /// kill work) and the next [`Runner::open`] reattaches to them. Stops already
    /// under way are finished first.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let tasks: Vec<JoinHandle<()>> = self
            .inner
            .lock()
            .values_mut()
            .filter_map(|e| e.task.take())
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    /// What the first run of a wanted allocation's task needs; a `model-server`
    /// task becomes the `exec` task of a model server with its endpoint.
    fn context(
        &self,
        alloc: &aigrid_api::Allocation,
        task: &TaskSpec,
    ) -> Result<TaskContext, String> {
        let (task, endpoint, grants) = match task {
            TaskSpec::Exec(task) => (task.clone(), None, Grants::default()),
            TaskSpec::ModelServer(server) => {
                let site = self.inner.site.lock().expect("site lock").clone();
                let config = &self.inner.config;
                let (task, endpoint) = model_server::exec_task(
                    &config.model_server,
                    &site,
                    &config.data_dir,
                    alloc,
                    server,
                )?;
                let grants =
                    model_server::grants(&config.model_server, &config.data_dir, &config.sandbox);
                (task, Some(endpoint), grants)
            }
        };
        Ok(TaskContext {
            alloc: alloc.clone(),
            task,
            restarts: 0,
            endpoint,
            grants,
        })
    }

    fn spawn(&self, ctx: TaskContext, entry: &Entry, start: Start) -> JoinHandle<()> {
        let control = entry.control.subscribe();
        let inner = self.inner.clone();
        self.inner
            .runtime
            .spawn(lifecycle(inner, ctx, start, control))
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AllocId, Entry>> {
        self.entries.lock().expect("runner entries lock")
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes an allocation's report, telling watchers when it really changed.
    fn update(&self, id: &AllocId, f: impl FnOnce(&mut AllocationReport)) {
        let changed = {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(id) else {
                return;
            };
            let before = entry.report.clone();
            f(&mut entry.report);
            if let Some(reason) = &mut entry.report.reason {
                truncate_reason(reason);
            }
            entry.report != before
        };
        if changed {
            self.bump();
        }
    }

    fn set(&self, id: &AllocId, state: AllocState, reason: Option<String>) {
        self.update(id, |r| {
            r.state = state;
            r.reason = reason;
        });
    }
}

fn truncate_reason(reason: &mut String) {
    if reason.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
}

/// The reason reported by an allocation found stopped by an earlier agent until the
/// control plane says whether it still wants it.
const RESUME_REASON: &str =
    "stopped when the last agent shut down; starts again if the control plane still wants it";

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::driver::RecordingDriver;
    use crate::testkit::ScriptedDriver;

    fn assignment(id: &str, desired: &str, task: serde_json::Value) -> Assignment {
        crate::testkit::assignment(id, desired, &[], task)
    }

    fn exec(restart: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "driver": "exec", "command": "/bin/true", "restart": restart,
            "artifacts": [{"source": "https://x.test/w.bin", "blake3": "00".repeat(32)}]
        })
    }

    fn config(dir: &std::path::Path) -> RunnerConfig {
        RunnerConfig::new(
            dir.to_owned(),
            SupervisorLaunch {
                program: "/nonexistent".into(),
                args: vec![],
            },
        )
    }

    async fn settle<F: Fn(&[AllocationReport]) -> bool>(
        runner: &Runner,
        done: F,
    ) -> Vec<AllocationReport> {
        for _ in 0..1000 {
            let reports = runner.reports();
            if done(&reports) {
                return reports;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never settled: {:?}", runner.reports());
    }

    fn state(reports: &[AllocationReport], id: &str) -> Option<AllocState> {
        reports
            .iter()
            .find(|r| r.id.as_str() == id)
            .map(|r| r.state)
    }

    #[tokio::test]
    async fn recording_runner_touches_no_disk() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("never-created");
        let driver = RecordingDriver::new();
        let runner = Runner::open(config(&data_dir), Arc::new(driver.clone()))
            .await
            .unwrap();
        let mut changes = runner.changes();
        let run = [
            assignment("a1", "run", exec(serde_json::json!({}))),
            assignment(
                "a2",
                "run",
                serde_json::json!({"driver": "model-server", "model": "m"}),
            ),
            assignment("a3", "run", serde_json::Value::Null),
            assignment("a4", "stop", serde_json::Value::Null),
        ];
        runner.apply(&run);
        let reports = settle(&runner, |r| state(r, "a1") == Some(AllocState::Running)).await;
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        // No server is known yet to load the model from: the model server fails.
        assert_eq!(state(&reports, "a2"), Some(AllocState::Failed));
        assert!(
            reports[1]
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("no control-plane server")),
            "{:?}",
            reports[1].reason
        );
        assert_eq!(state(&reports, "a3"), None, "never started without a task");
        assert_eq!(state(&reports, "a4"), Some(AllocState::Stopped));
        assert_eq!(reports[0].limits, Some(LimitsEnforcement::NotEnforced));
        // Applying the same view again starts nothing twice.
        runner.apply(&run);
        assert_eq!(driver.starts(), 1);
        assert!(runner.log_tails(10).is_empty());

        runner.apply(&[]);
        settle(&runner, |r| state(r, "a1") == Some(AllocState::Stopped)).await;
        assert_eq!(driver.stops(), 1);
        assert!(changes.has_changed().unwrap());
        // Terminal and absent from two applies in a row: forgotten.
        runner.apply(&[]);
        let left: Vec<_> = runner.reports().into_iter().map(|r| r.id).collect();
        assert_eq!(left, [AllocId::new("a1")]);
        runner.apply(&[]);
        assert!(runner.reports().is_empty());
        let events = driver.events();
        assert!(
            matches!(&events[0], crate::driver::Recorded::Artifact { source, .. } if source == "https://x.test/w.bin")
        );
        runner.shutdown().await;
        assert!(!data_dir.exists(), "the recording driver wrote to disk");
    }

    #[tokio::test]
    async fn desired_stop_stops_a_running_allocation() {
        let driver = RecordingDriver::new();
        let runner = Runner::open(config(Path::new("/nonexistent")), Arc::new(driver.clone()))
            .await
            .unwrap();
        runner.apply(&[assignment("a1", "run", exec(serde_json::json!({})))]);
        settle(&runner, |r| state(r, "a1") == Some(AllocState::Running)).await;
        runner.apply(&[assignment("a1", "stop", exec(serde_json::json!({})))]);
        settle(&runner, |r| state(r, "a1") == Some(AllocState::Stopped)).await;
        // Stop is final: a later "run" for the same allocation does not restart it.
        runner.apply(&[assignment("a1", "run", exec(serde_json::json!({})))]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!((driver.starts(), driver.stops()), (1, 1));
    }

    async fn run_codes(codes: &[i32], restart: serde_json::Value) -> (AllocationReport, usize) {
        let driver = Arc::new(ScriptedDriver::new(codes.iter().copied()));
        let runner = Runner::open(config(Path::new("/nonexistent")), driver.clone())
            .await
            .unwrap();
        runner.apply(&[assignment("a", "run", exec(restart))]);
        let reports = settle(&runner, |r| r[0].state.is_terminal()).await;
        (reports[0].clone(), driver.started().len())
    }

    #[tokio::test(start_paused = true)]
    async fn restart_policy_decides_after_each_exit() {
        let policy = serde_json::json!({"attempts": 2, "delay_ms": 100});
        let (report, starts) = run_codes(&[3, 3, 3], policy.clone()).await;
        assert_eq!(report.state, AllocState::Failed);
        assert_eq!(report.restarts, 2);
        assert_eq!(starts, 3);
        assert_eq!(
            report.reason.as_deref(),
            Some("exited with code 3 after 2 restarts")
        );
        assert_eq!(report.limits, Some(LimitsEnforcement::Enforced));

        let (report, starts) = run_codes(&[3, 0], policy.clone()).await;
        assert_eq!(
            (report.state, report.restarts, starts),
            (AllocState::Complete, 1, 2)
        );

        let (report, starts) = run_codes(&[0], policy).await;
        assert_eq!(
            (report.state, report.restarts, starts),
            (AllocState::Complete, 0, 1)
        );

        let never = serde_json::json!({"mode": "never"});
        let (report, starts) = run_codes(&[1], never).await;
        assert_eq!((report.state, starts), (AllocState::Failed, 1));
        assert_eq!(report.reason.as_deref(), Some("exited with code 1"));
    }

    #[test]
    fn long_reasons_are_cut_on_a_character() {
        let mut reason = "é".repeat(MAX_REASON_LEN);
        truncate_reason(&mut reason);
        assert!(reason.len() <= MAX_REASON_LEN);
        assert!(reason.chars().all(|c| c == 'é'));
    }
}
