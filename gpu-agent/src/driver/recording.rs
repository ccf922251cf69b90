//! A driver that runs nothing: it records what it was asked to do, in memory, so a
//! single process can simulate thousands of nodes (`--simulate-fleet`). Its tasks
//! are running as soon as they start and never exit on their own; it touches no
//! disk and fetches no artifact (it records them instead).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aigrid_api::{AllocId, LimitsEnforcement, LogTail};

use super::{
    BoxFuture, Driver, DriverError, LogMark, RecoveredTask, TaskContext, TaskExit, TaskHandle,
};
use crate::config::RunnerConfig;

/// Something a [`RecordingDriver`] was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// An artifact a task would have fetched.
    Artifact {
        /// The allocation.
        alloc: AllocId,
        /// The artifact's source.
        source: String,
    },
    /// A run started, after `restarts` restarts.
    Start {
        /// The allocation.
        alloc: AllocId,
        /// In-place restarts before this run.
        restarts: u32,
    },
    /// A run stopped.
    Stop {
        /// The allocation.
        alloc: AllocId,
    },
}

#[derive(Debug, Default)]
struct Log {
    starts: AtomicU64,
    stops: AtomicU64,
    events: Mutex<Vec<Recorded>>,
}

impl Log {
    fn push(&self, event: Recorded) {
        self.events.lock().expect("events lock").push(event);
    }
}

/// Records starts and stops instead of running anything. Cheap: clones share one
/// record, so one driver can serve many runners or each runner can have its own.
#[derive(Debug, Clone, Default)]
pub struct RecordingDriver {
    log: Arc<Log>,
}

impl RecordingDriver {
    /// A driver with an empty record.
    pub fn new() -> Self {
        RecordingDriver::default()
    }

    /// Runs started so far.
    pub fn starts(&self) -> u64 {
        self.log.starts.load(Ordering::Relaxed)
    }

    /// Runs stopped so far.
    pub fn stops(&self) -> u64 {
        self.log.stops.load(Ordering::Relaxed)
    }

    /// Everything recorded, oldest first.
    pub fn events(&self) -> Vec<Recorded> {
        self.log.events.lock().expect("events lock").clone()
    }
}

impl Driver for RecordingDriver {
    fn limits(&self) -> (LimitsEnforcement, Option<String>) {
        (
            LimitsEnforcement::NotEnforced,
            Some("the recording driver runs no process".into()),
        )
    }

    fn recover<'a>(
        &'a self,
        _config: &'a RunnerConfig,
    ) -> BoxFuture<'a, Result<Vec<RecoveredTask>, DriverError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn prepare<'a>(
        &'a self,
        _config: &'a RunnerConfig,
        ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        for artifact in &ctx.task.artifacts {
            self.log.push(Recorded::Artifact {
                alloc: ctx.alloc.id.clone(),
                source: artifact.source.clone(),
            });
        }
        Box::pin(async { Ok(()) })
    }

    fn start<'a>(
        &'a self,
        _config: &'a RunnerConfig,
        ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Box<dyn TaskHandle>, DriverError>> {
        self.log.starts.fetch_add(1, Ordering::Relaxed);
        self.log.push(Recorded::Start {
            alloc: ctx.alloc.id.clone(),
            restarts: ctx.restarts,
        });
        let handle = RecordingHandle {
            alloc: ctx.alloc.id.clone(),
            log: self.log.clone(),
        };
        Box::pin(async move { Ok(Box::new(handle) as Box<dyn TaskHandle>) })
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

struct RecordingHandle {
    alloc: AllocId,
    log: Arc<Log>,
}

impl TaskHandle for RecordingHandle {
    fn limits(&self) -> LimitsEnforcement {
        LimitsEnforcement::NotEnforced
    }

    fn wait(&self) -> BoxFuture<'_, TaskExit> {
        Box::pin(std::future::pending())
    }

    fn stop(&self, _grace: Duration) -> BoxFuture<'_, ()> {
        self.log.stops.fetch_add(1, Ordering::Relaxed);
        self.log.push(Recorded::Stop {
            alloc: self.alloc.clone(),
        });
        Box::pin(async {})
    }
}
