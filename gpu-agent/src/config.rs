//! What the allocation runner and its drivers are given: where allocations live,
//! how supervisors and model servers are started, the HTTP client for artifacts and
//! the log limits. Kept apart from the runner so drivers can read it
//! without importing the runner that drives them.

use std::io;
use std::path::PathBuf;

use crate::model_server::ModelServerLaunch;
use crate::sandbox::SandboxConfig;

/// Size of one log file before it rotates: 10 MiB.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated log files kept per stream.
pub const DEFAULT_LOG_MAX_FILES: u32 = 5;

/// How to start a supervisor: `<program> <args..> <alloc_dir>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorLaunch {
    /// The program, normally the `aigrid` binary itself.
    pub program: PathBuf,
    /// Arguments before the allocation directory, normally `["supervise"]`.
    pub args: Vec<String>,
}

impl SupervisorLaunch {
    /// `aigrid supervise`, through the running binary.
    pub fn current_exe() -> io::Result<Self> {
        Ok(SupervisorLaunch {
            program: std::env::current_exe()?,
            args: vec!["supervise".into()],
        })
    }
}

/// What a [`Runner`] needs.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Allocation directories live under `<data_dir>/allocs/<alloc-id>/`, the
    /// artifact cache under `<data_dir>/artifacts/`, model servers' cache under
    /// `<data_dir>/model-cache/`.
    pub data_dir: PathBuf,
    /// How to start a supervisor.
    pub supervisor: SupervisorLaunch,
    /// How to start a model server (`model-server` tasks).
    pub model_server: ModelServerLaunch,
    /// The client for http(s) artifacts.
    pub http: reqwest::Client,
    /// Size of one log file before it rotates.
    pub log_max_bytes: u64,
    /// Rotated log files kept per stream.
    pub log_max_files: u32,
    /// Workload uids, what model servers may read, what no workload may see.
    pub sandbox: SandboxConfig,
}

impl RunnerConfig {
    /// A configuration with default log limits and HTTP client; model servers run
    /// as `<the supervisor's program> serve`, the same binary's other role.
    pub fn new(data_dir: PathBuf, supervisor: SupervisorLaunch) -> Self {
        RunnerConfig {
            data_dir,
            model_server: ModelServerLaunch::serve(supervisor.program.clone()),
            supervisor,
            http: reqwest::Client::new(),
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            log_max_files: DEFAULT_LOG_MAX_FILES,
            sandbox: SandboxConfig::default(),
        }
    }
}
