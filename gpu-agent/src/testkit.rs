//! Fixtures for tests of the agent and of what is built on it: allocations and
//! assignments as the control plane sends them, and a driver whose runs exit as a
//! test scripts them, so a test fails only for the reason it is about.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use aigrid_api::{AllocId, Allocation, Assignment, LimitsEnforcement, LogTail};

use crate::config::RunnerConfig;
use crate::driver::{
    BoxFuture, Driver, DriverError, LogMark, RecoveredStatus, RecoveredTask, TaskContext, TaskExit,
    TaskHandle,
};

/// A pending allocation `id` of job `j-1` (instance 2 of group `train`) on node
/// `n-1`, with `desired` (`run` or `stop`) and the GPUs `gpus`.
pub fn allocation(id: &str, desired: &str, gpus: &[&str]) -> Allocation {
    serde_json::from_value(serde_json::json!({
        "id": id, "job_id": "j-1", "job_version": 1, "node_id": "n-1",
        "group": "train", "index": 2,
        "resources": {"cpu_millis": 1000, "memory_mib": 512},
        "gpus": gpus, "state": "pending", "desired": desired,
        "created_at": 0, "updated_at": 0
    }))
    .expect("an allocation")
}

/// The [`allocation`] with the task `task` (JSON of a task spec; `null` for none).
pub fn assignment(id: &str, desired: &str, gpus: &[&str], task: serde_json::Value) -> Assignment {
    Assignment {
        allocation: allocation(id, desired, gpus),
        task: serde_json::from_value(task).expect("a task spec"),
    }
}

/// A driver whose runs exit with the scripted codes, one a run, and run until
/// stopped once the script is spent. It records what each run was started with,
/// and recovers the last run started as still running (what an earlier agent left
/// running, as its `task.json` records it). Its runs report their limits as
/// enforced, so a test can tell them from the runner's defaults.
#[derive(Debug, Default)]
pub struct ScriptedDriver {
    exits: Mutex<VecDeque<i32>>,
    started: Mutex<Vec<TaskContext>>,
}

impl ScriptedDriver {
    /// A driver whose first runs exit with `exits`, in order.
    pub fn new(exits: impl IntoIterator<Item = i32>) -> Self {
        ScriptedDriver {
            exits: Mutex::new(exits.into_iter().collect()),
            started: Mutex::default(),
        }
    }

    /// What each run was started with, oldest first.
    pub fn started(&self) -> Vec<TaskContext> {
        self.started.lock().expect("started lock").clone()
    }
}

/// A run that exits with its code, or with none runs until stopped.
struct ScriptedRun(Option<i32>);

impl TaskHandle for ScriptedRun {
    fn limits(&self) -> LimitsEnforcement {
        LimitsEnforcement::Enforced
    }

    fn wait(&self) -> BoxFuture<'_, TaskExit> {
        match self.0 {
            Some(code) => Box::pin(async move { TaskExit::Code(code) }),
            None => Box::pin(std::future::pending()),
        }
    }

    fn stop(&self, _grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl Driver for ScriptedDriver {
    fn limits(&self) -> (LimitsEnforcement, Option<String>) {
        (LimitsEnforcement::Enforced, None)
    }

    fn recover<'a>(
        &'a self,
        _config: &'a RunnerConfig,
    ) -> BoxFuture<'a, Result<Vec<RecoveredTask>, DriverError>> {
        let last = self.started().pop();
        Box::pin(async move {
            Ok(last
                .into_iter()
                .map(|ctx| RecoveredTask {
                    ctx,
                    status: RecoveredStatus::Running(Box::new(ScriptedRun(None))),
                })
                .collect())
        })
    }

    fn prepare<'a>(
        &'a self,
        _config: &'a RunnerConfig,
        _ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async { Ok(()) })
    }

    fn start<'a>(
        &'a self,
        _config: &'a RunnerConfig,
        ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Box<dyn TaskHandle>, DriverError>> {
        self.started.lock().expect("started lock").push(ctx.clone());
        let exit = self.exits.lock().expect("exits lock").pop_front();
        Box::pin(async move { Ok(Box::new(ScriptedRun(exit)) as Box<dyn TaskHandle>) })
    }

    fn log_mark(&self, _config: &RunnerConfig, _id: &AllocId) -> Option<LogMark> {
        None
    }

    fn log_tail(&self, _config: &RunnerConfig, _id: &AllocId) -> Option<LogTail> {
        None
    }

    fn destroy<'a>(&'a self, _config: &'a RunnerConfig, _id: &'a AllocId) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}
