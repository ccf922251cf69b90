//! Workload drivers: how an allocation's task is actually run.
//!
//! The [`Runner`](crate::runner::Runner) owns the lifecycle (artifacts first,
//! restart policy, stop requests, reports); a [`Driver`] only prepares, starts,
//! watches and stops one run of a task, and finds the runs it left behind when the
//! agent restarts.
//!
//! - [`ExecDriver`]: a real process under a detached supervisor (`exec`).
//! - [`RecordingDriver`]: records starts and stops in memory, for simulated fleets.

mod exec;
mod recording;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use aigrid_api::{AllocId, Allocation, ExecTask, LimitsEnforcement, LogTail, NodeProtections};

use crate::artifact::ArtifactError;
use crate::config::RunnerConfig;
use crate::logs::FileMark;
use crate::sandbox::Grants;

pub use exec::{workload_env, ExecDriver, DEFAULT_PATH};
pub use recording::{Recorded, RecordingDriver};

/// A boxed future, so drivers can be trait objects without `async_trait`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One run of an allocation's task: what a driver needs to start it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskContext {
    /// The allocation (its ids, GPUs and resources).
    pub alloc: Allocation,
    /// The task.
    pub task: ExecTask,
    /// In-place restarts before this run.
    pub restarts: u32,
    /// Where the task serves (`http://host:port`), for tasks that listen (model
    /// servers); reported with the allocation's state.
    pub endpoint: Option<String>,
    /// What its sandbox lets it reach beyond its own directory and the system,
    /// as the agent decided for its kind of task (a model server's cache).
    pub grants: Grants,
}

/// How one run of a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskExit {
    /// The process exited with this code.
    Code(i32),
    /// A signal killed the process.
    Signal(i32),
    /// The process could not be started, or the node lost track of it.
    Error(String),
}

impl TaskExit {
    /// True for exit code 0, the only success.
    pub fn success(&self) -> bool {
        *self == TaskExit::Code(0)
    }

    /// The one-line reason reported for it after `restarts` in-place restarts:
    /// `exited with code 3 after 2 restarts`, `killed by signal 9 (SIGKILL)`.
    pub fn reason(&self, restarts: u32) -> String {
        let what = match self {
            TaskExit::Code(code) => format!("exited with code {code}"),
            TaskExit::Signal(signal) => match nix::sys::signal::Signal::try_from(*signal) {
                Ok(name) => format!("killed by signal {signal} ({name})"),
                Err(_) => format!("killed by signal {signal}"),
            },
            TaskExit::Error(error) => error.split_whitespace().collect::<Vec<_>>().join(" "),
        };
        match restarts {
            0 => what,
            1 => format!("{what} after 1 restart"),
            n => format!("{what} after {n} restarts"),
        }
    }
}

/// A run a driver found still going, or finished, when the agent started.
pub struct RecoveredTask {
    /// What was running, as it was started.
    pub ctx: TaskContext,
    /// Where it stands now.
    pub status: RecoveredStatus,
}

/// Where a recovered run stands.
pub enum RecoveredStatus {
    /// Still running: watch it through this handle.
    Running(Box<dyn TaskHandle>),
    /// It ended while no agent watched (or the node lost track of it).
    Exited(TaskExit),
    /// An agent stopped it (at the control plane's word or at its own shutdown):
    /// it did not finish, and runs again only if the control plane still wants it.
    Stopped,
}

/// Why a driver could not prepare or start a task. The text is the allocation's
/// failure reason.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// An artifact could not be fetched or did not verify.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The allocation id cannot name a directory.
    #[error("invalid allocation id `{0}` (want 1 to 128 of A-Z a-z 0-9 . _ -)")]
    InvalidId(String),
    /// A file or directory the driver needs could not be used.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What the driver was doing.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The task could not be started.
    #[error("{0}")]
    Start(String),
}

impl DriverError {
    /// The error as a single line, for a report's `reason`.
    pub fn reason(&self) -> String {
        self.to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How far an allocation's output has grown; compared to tell whether its tail
/// changed since it was last shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogMark(pub(crate) [Option<FileMark>; 2]);

/// A running task, as its driver watches it.
pub trait TaskHandle: Send + Sync {
    /// Whether the run is held to its CPU and memory reservation.
    fn limits(&self) -> LimitsEnforcement;

    /// Resolves when the run ends. Cancel-safe: dropping it only stops watching.
    fn wait(&self) -> BoxFuture<'_, TaskExit>;

    /// Asks the run to end (SIGTERM) and ends it (SIGKILL) after `grace`; resolves
    /// once it is gone.
    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()>;
}

/// Runs tasks of one kind on this node.
pub trait Driver: Send + Sync + 'static {
    /// Whether this driver's runs are held to their reservations, and why not.
    /// Probed once; later calls answer the same.
    fn limits(&self) -> (LimitsEnforcement, Option<String>);

    /// What keeps this driver's workloads from the node's credentials and from
    /// one another; `None` for drivers that run no process. Probed once.
    fn protections(&self, _config: &RunnerConfig) -> Option<NodeProtections> {
        None
    }

    /// Finds runs started by an earlier agent on this node.
    fn recover<'a>(
        &'a self,
        config: &'a RunnerConfig,
    ) -> BoxFuture<'a, Result<Vec<RecoveredTask>, DriverError>>;

    /// Gets a task ready to start the first time: fetches and verifies its artifacts.
    fn prepare<'a>(
        &'a self,
        config: &'a RunnerConfig,
        ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<(), DriverError>>;

    /// Starts one run of a prepared task.
    fn start<'a>(
        &'a self,
        config: &'a RunnerConfig,
        ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Box<dyn TaskHandle>, DriverError>>;

    /// How far the allocation's output has grown; `None` when it has none.
    fn log_mark(&self, config: &RunnerConfig, id: &AllocId) -> Option<LogMark>;

    /// The end of the allocation's output.
    fn log_tail(&self, config: &RunnerConfig, id: &AllocId) -> Option<LogTail>;

    /// Forgets a finished allocation: removes whatever the driver kept for it.
    fn destroy<'a>(&'a self, config: &'a RunnerConfig, id: &'a AllocId) -> BoxFuture<'a, ()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons() {
        assert_eq!(TaskExit::Code(3).reason(0), "exited with code 3");
        assert_eq!(
            TaskExit::Code(3).reason(2),
            "exited with code 3 after 2 restarts"
        );
        assert_eq!(
            TaskExit::Signal(9).reason(1),
            "killed by signal 9 (SIGKILL) after 1 restart"
        );
        assert_eq!(TaskExit::Error("a\nb".into()).reason(0), "a b");
        assert!(TaskExit::Code(0).success());
        assert!(!TaskExit::Signal(15).success());
    }

    #[test]
    fn restart_delays_double_up_to_the_cap() {
        let policy: aigrid_api::RestartPolicy =
            serde_json::from_str(r#"{"attempts": 5, "delay_ms": 100, "max_delay_ms": 350}"#)
                .unwrap();
        let delays: Vec<u128> = (0..5).map(|n| policy.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350, 350]);
        assert!(policy.should_restart(false, 4));
        assert!(!policy.should_restart(false, 5));
        assert!(!policy.should_restart(true, 0));
    }
}
