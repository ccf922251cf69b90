//! The `exec` driver: a process started from a command line, under a detached
//! supervisor (see [`crate::supervisor`] for the files they share).
//!
//! The agent never blocks in `waitpid` on a supervisor: it polls the supervisor's
//! liveness (pid plus `/proc` start time, so a reused pid is not mistaken for it)
//! and reads `exit.json`, which works the same for a supervisor it started and one
//! an earlier agent started. The polls read a few small local files; they run on
//! the async runtime, as a `stat` does not block it in any way that matters.

// Unsafe: a `pre_exec` hook that calls setsid between fork and exec.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aigrid_api::allocation::MAX_LOG_TAIL_BYTES;
use aigrid_api::{AllocId, Allocation, ExecTask, LimitsEnforcement, LogTail, NodeProtections};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::{
    BoxFuture, Driver, DriverError, LogMark, RecoveredStatus, RecoveredTask, TaskContext, TaskExit,
    TaskHandle,
};
use crate::artifact::ArtifactStore;
use crate::cgroup::{self, CgroupPlan, Probe};
use crate::config::RunnerConfig;
use crate::logs;
use crate::sandbox::{self, Layout, Owner, UidTable};
use crate::supervisor::{
    read_json, write_json_atomic, ExitRecord, ProcessRecord, StopRecord, TaskFile, WorkloadRecord,
    EXIT_FILE, LOCAL_DIR, LOGS_DIR, STDERR_LOG, STDOUT_LOG, STOP_FILE, SUPERVISOR_FILE,
    SUPERVISOR_LOG, TASK_FILE, WORKLOAD_FILE,
};

/// `PATH` for workloads when the agent has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often a running supervisor is checked on.
const POLL: Duration = Duration::from_millis(200);
/// How long a new supervisor may take to start its workload.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a supervisor gets to record the exit of a workload it saw killed.
const RECORD_TIMEOUT: Duration = Duration::from_secs(2);
/// The reason reported when a supervisor vanished without recording an exit.
const LOST: &str = "lost track of the process: supervisor died";

/// Runs `exec` tasks as real processes, each under its own supervisor, each
/// workload in its sandbox (see [`crate::sandbox`]).
#[derive(Debug, Default)]
pub struct ExecDriver {
    probe: OnceLock<Probe>,
    sandbox: OnceLock<sandbox::Probe>,
    uids: UidTable,
}

impl ExecDriver {
    /// A driver; cgroup support is probed on first use.
    pub fn new() -> Self {
        ExecDriver::default()
    }

    fn probe(&self) -> &Probe {
        self.probe.get_or_init(|| {
            let probe = cgroup::probe();
            if let Some(reason) = &probe.reason {
                tracing::warn!(%reason, "CPU and memory limits are not enforced on this node");
            }
            probe
        })
    }

    fn sandbox(&self, config: &RunnerConfig) -> &sandbox::Probe {
        self.sandbox
            .get_or_init(|| sandbox::probe(&config.sandbox, &config.data_dir, &allocs_dir(config)))
    }

    /// The uid and gid `ctx`'s runs take, when allocations get their own.
    fn owner(
        &self,
        config: &RunnerConfig,
        ctx: &TaskContext,
    ) -> Result<Option<Owner>, DriverError> {
        let Some(range) = self.sandbox(config).uids else {
            return Ok(None);
        };
        let uid = self
            .uids
            .take(&ctx.alloc.id, range, sandbox::uid_busy)
            .ok_or_else(|| {
                DriverError::Start(format!(
                    "no free workload uid left in {}-{}",
                    range.first,
                    range.first + (range.count - 1)
                ))
            })?;
        let gid = if ctx.grants.shared.is_empty() {
            uid
        } else {
            range.shared_gid()
        };
        Ok(Some(Owner { uid, gid }))
    }
}

fn allocs_dir(config: &RunnerConfig) -> PathBuf {
    config.data_dir.join("allocs")
}

fn artifacts_dir(config: &RunnerConfig) -> PathBuf {
    config.data_dir.join("artifacts")
}

/// The allocation's directory; its id becomes a path segment, so it is checked.
fn alloc_dir(config: &RunnerConfig, id: &AllocId) -> Result<PathBuf, DriverError> {
    let s = id.as_str();
    let valid = (1..=128).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(allocs_dir(config).join(s))
    } else {
        Err(DriverError::InvalidId(s.to_owned()))
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DriverError {
    let path = path.to_owned();
    move |source| DriverError::Io {
        action,
        path,
        source,
    }
}

/// The workload's complete environment: `PATH`, `HOME` and `LANG` from the agent's
/// environment (`agent_env`), then the task's variables, then what the node sets.
/// Nothing else of the agent's is passed on: in particular none of its `AIGRID_*`
/// settings (its join token among them), since workloads hold no control
/// credentials. `CUDA_VISIBLE_DEVICES` lists the allocation's GPUs and is empty
/// without any, so a CPU task sees no GPU.
pub fn workload_env(
    agent_env: impl IntoIterator<Item = (String, String)>,
    alloc: &Allocation,
    task: &ExecTask,
    task_dir: &Path,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = agent_env
        .into_iter()
        .filter(|(k, _)| matches!(k.as_str(), "PATH" | "HOME" | "LANG"))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.extend(task.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let gpus = alloc.gpus.join(",");
    env.insert("CUDA_VISIBLE_DEVICES".into(), gpus.clone());
    env.insert("NVIDIA_VISIBLE_DEVICES".into(), gpus);
    env.insert("AIGRID_ALLOC_ID".into(), alloc.id.to_string());
    env.insert("AIGRID_JOB_ID".into(), alloc.job_id.to_string());
    env.insert("AIGRID_GROUP".into(), alloc.group.clone());
    env.insert("AIGRID_ALLOC_INDEX".into(), alloc.index.to_string());
    env.insert(
        "AIGRID_TASK_DIR".into(),
        task_dir.to_string_lossy().into_owned(),
    );
    env
}

/// The environment of a sandboxed run: `HOME` is its `local/` and `TMPDIR` its
/// `tmp/` (what the agent's would name is out of its reach) unless the task sets
/// them, and `AIGRID_SECRETS_DIR` names the directory of its secret files.
pub fn sandboxed_env(
    mut env: BTreeMap<String, String>,
    task: &ExecTask,
    layout: &Layout,
) -> BTreeMap<String, String> {
    for (name, dir) in [("HOME", &layout.local), ("TMPDIR", &layout.tmp)] {
        if !task.env.contains_key(name) {
            env.insert(name.into(), dir.to_string_lossy().into_owned());
        }
    }
    env.insert(
        "AIGRID_SECRETS_DIR".into(),
        layout.secrets.to_string_lossy().into_owned(),
    );
    env
}

fn agent_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

impl Driver for ExecDriver {
    fn limits(&self) -> (LimitsEnforcement, Option<String>) {
        let probe = self.probe();
        (probe.enforcement, probe.reason.clone())
    }

    fn protections(&self, config: &RunnerConfig) -> Option<NodeProtections> {
        Some(self.sandbox(config).protections.clone())
    }

    fn recover<'a>(
        &'a self,
        config: &'a RunnerConfig,
    ) -> BoxFuture<'a, Result<Vec<RecoveredTask>, DriverError>> {
        let dir = allocs_dir(config);
        Box::pin(async move {
            let found = tokio::task::spawn_blocking(move || recover_all(&dir))
                .await
                .map_err(|e| DriverError::Start(format!("recovery failed: {e}")))??;
            Ok(found
                .into_iter()
                .map(|(task, uid)| {
                    if let Some(uid) = uid {
                        self.uids.adopt(&task.ctx.alloc.id, uid);
                    }
                    task
                })
                .collect())
        })
    }

    fn prepare<'a>(
        &'a self,
        config: &'a RunnerConfig,
        ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let layout = Layout::new(&alloc_dir(config, &ctx.alloc.id)?, LOCAL_DIR);
            let local = layout.local.clone();
            let owner = self.owner(config, ctx)?;
            tokio::task::spawn_blocking(move || {
                sandbox::make_dirs(&layout, owner).map_err(io_err("create", &layout.local))
            })
            .await
            .map_err(|e| DriverError::Start(e.to_string()))??;
            let store = ArtifactStore::new(artifacts_dir(config), config.http.clone());
            for artifact in &ctx.task.artifacts {
                store.place(artifact, &local).await?;
            }
            Ok(())
        })
    }

    fn start<'a>(
        &'a self,
        config: &'a RunnerConfig,
        ctx: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Box<dyn TaskHandle>, DriverError>> {
        Box::pin(async move {
            let dir = alloc_dir(config, &ctx.alloc.id)?;
            let layout = Layout::new(&dir, LOCAL_DIR);
            let owner = self.owner(config, ctx)?;
            let protected = self.sandbox(config).protected.clone();
            let plan = self.probe().plan(
                ctx.alloc.id.as_str(),
                ctx.alloc.resources.cpu_millis,
                ctx.alloc.resources.memory_mib,
            );
            let file = TaskFile {
                alloc: ctx.alloc.clone(),
                task: ctx.task.clone(),
                restarts: ctx.restarts,
                command: ctx.task.command.clone(),
                args: ctx.task.args.clone(),
                env: sandboxed_env(
                    workload_env(agent_env(), &ctx.alloc, &ctx.task, &layout.local),
                    &ctx.task,
                    &layout,
                ),
                cwd: dir.join(LOCAL_DIR),
                cgroup: plan.clone(),
                log_max_bytes: config.log_max_bytes,
                log_max_files: config.log_max_files,
                endpoint: ctx.endpoint.clone(),
                grants: ctx.grants.clone(),
                sandbox: None,
            };
            let (gpus, grants) = (!ctx.alloc.gpus.is_empty(), ctx.grants.clone());
            let secrets = ctx.task.env.clone();
            let log = tokio::task::spawn_blocking(move || {
                let mut file = file;
                sandbox::make_dirs(&layout, owner).map_err(io_err("create", &layout.local))?;
                for shared in &grants.shared {
                    let made = match owner {
                        Some(o) => sandbox::make_shared(shared, o.gid),
                        None => fs::create_dir_all(shared),
                    };
                    made.map_err(io_err("share", shared))?;
                }
                let skipped = sandbox::write_secrets(&layout.secrets, &secrets, owner)
                    .map_err(io_err("write secrets in", &layout.secrets))?;
                if !skipped.is_empty() {
                    tracing::warn!(
                        alloc = %file.alloc.id,
                        ?skipped,
                        "variables whose names cannot be file names reach the workload in its environment only"
                    );
                }
                file.sandbox = Some(sandbox::plan(&layout, owner, &grants, gpus, &protected));
                write_task(&layout.alloc_dir, &file)
            })
                .await
                .map_err(|e| DriverError::Start(e.to_string()))??;
            let handle = spawn_supervisor(config, &dir, log, plan)?;
            handle.await_workload().await?;
            Ok(Box::new(handle) as Box<dyn TaskHandle>)
        })
    }

    fn log_mark(&self, config: &RunnerConfig, id: &AllocId) -> Option<LogMark> {
        let logs = alloc_dir(config, id).ok()?.join(LOGS_DIR);
        let marks = [
            logs::mark(&logs.join(STDOUT_LOG)),
            logs::mark(&logs.join(STDERR_LOG)),
        ];
        (marks != [None, None]).then_some(LogMark(marks))
    }

    fn log_tail(&self, config: &RunnerConfig, id: &AllocId) -> Option<LogTail> {
        let logs = alloc_dir(config, id).ok()?.join(LOGS_DIR);
        let read = |name: &str| {
            logs::tail(&logs.join(name), config.log_max_files, MAX_LOG_TAIL_BYTES)
                .map(|bytes| logs::lossy_text(&bytes))
                .unwrap_or_default()
        };
        Some(LogTail {
            id: id.clone(),
            stdout: read(STDOUT_LOG),
            stderr: read(STDERR_LOG),
        })
    }

    fn destroy<'a>(&'a self, config: &'a RunnerConfig, id: &'a AllocId) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Ok(dir) = alloc_dir(config, id) else {
                return;
            };
            let result = tokio::task::spawn_blocking(move || {
                let removed = sandbox::remove_secrets(&dir.join(sandbox::SECRETS_DIR))
                    .and_then(|()| fs::remove_dir_all(&dir));
                match removed {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err((dir, e)),
                    _ => Ok(()),
                }
            })
            .await;
            match result {
                Ok(Err((dir, e))) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove allocation directory");
                }
                // Its files are gone: the uid may serve another allocation.
                _ => self.uids.release(id),
            }
        })
    }
}

/// Lays out the allocation directory for a new run and opens the supervisor's log.
fn write_task(dir: &Path, file: &TaskFile) -> Result<fs::File, DriverError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let logs = dir.join(LOGS_DIR);
    fs::create_dir_all(&logs).map_err(io_err("create", &logs))?;
    fs::set_permissions(&logs, fs::Permissions::from_mode(0o700))
        .map_err(io_err("protect", &logs))?;
    // What the previous run left must not be mistaken for this one's.
    for stale in [EXIT_FILE, STOP_FILE, WORKLOAD_FILE, SUPERVISOR_FILE] {
        let path = dir.join(stale);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("remove", &path)(e));
            }
            _ => {}
        }
    }
    let task_path = dir.join(TASK_FILE);
    write_json_atomic(&task_path, file).map_err(io_err("write", &task_path))?;
    let log_path = dir.join(SUPERVISOR_LOG);
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(io_err("open", &log_path))
}

/// Starts `<program> <args..> <alloc_dir>` in a new session, detached from the agent
/// so that it outlives it.
fn spawn_supervisor(
    config: &RunnerConfig,
    dir: &Path,
    log: fs::File,
    cgroup: Option<CgroupPlan>,
) -> Result<ExecHandle, DriverError> {
    let launch = &config.supervisor;
    let stderr = log.try_clone().map_err(io_err("open", dir))?;
    let mut command = tokio::process::Command::new(&launch.program);
    command
        .args(&launch.args)
        .arg(dir)
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into()),
        )
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .kill_on_drop(false);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let child = command.spawn().map_err(|e| {
        DriverError::Start(format!(
            "cannot start the supervisor `{}`: {e}",
            launch.program.display()
        ))
    })?;
    let pid = child.id().map_or(0, |p| p as i32);
    // The child is not reaped before we look, so its /proc entry is there.
    let supervisor = ProcessRecord::of(pid).unwrap_or(ProcessRecord { pid, start_time: 0 });
    Ok(ExecHandle {
        dir: dir.to_owned(),
        supervisor,
        child: Mutex::new(Some(child)),
        limits: Mutex::new(LimitsEnforcement::NotEnforced),
        cgroup,
    })
}

/// The runs found under `dir`, each with the uid it holds.
fn recover_all(dir: &Path) -> Result<Vec<(RecoveredTask, Option<u32>)>, DriverError> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let Ok(entry) = entry else { continue };
        let alloc_dir = entry.path();
        let task: TaskFile = match read_json(&alloc_dir.join(TASK_FILE)) {
            Ok(Some(task)) => task,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(dir = %alloc_dir.display(), error = %e, "skipping unreadable allocation");
                continue;
            }
        };
        let ctx = TaskContext {
            alloc: task.alloc.clone(),
            task: task.task.clone(),
            restarts: task.restarts,
            endpoint: task.endpoint.clone(),
            grants: task.grants.clone(),
        };
        let uid = task.sandbox.as_ref().and_then(|s| s.uid);
        let handle = ExecHandle {
            dir: alloc_dir.clone(),
            supervisor: read_json::<ProcessRecord>(&alloc_dir.join(SUPERVISOR_FILE))
                .ok()
                .flatten()
                .unwrap_or(ProcessRecord {
                    pid: 0,
                    start_time: 0,
                }),
            child: Mutex::new(None),
            limits: Mutex::new(LimitsEnforcement::NotEnforced),
            cgroup: task.cgroup.clone(),
        };
        let status = if let Some(exit) = handle.recorded_exit() {
            handle.remove_cgroup_blocking();
            RecoveredStatus::Exited(exit)
        } else if handle.supervisor.is_alive() {
            if let Some(workload) = handle.workload() {
                *handle.limits.lock().expect("limits lock") = workload.limits;
            }
            RecoveredStatus::Running(Box::new(handle))
        } else {
            handle.kill_orphan();
            handle.remove_cgroup_blocking();
            RecoveredStatus::Exited(TaskExit::Error(LOST.into()))
        };
        // However a run the agent asked to stop ended, the stop ended it.
        let status = match status {
            RecoveredStatus::Exited(_) if alloc_dir.join(STOP_FILE).exists() => {
                RecoveredStatus::Stopped
            }
            status => status,
        };
        found.push((RecoveredTask { ctx, status }, uid));
    }
    Ok(found)
}

/// One run under a supervisor, started by this agent or found on disk.
struct ExecHandle {
    dir: PathBuf,
    supervisor: ProcessRecord,
    /// The supervisor as our child, when we started it: polling it reaps it.
    child: Mutex<Option<tokio::process::Child>>,
    limits: Mutex<LimitsEnforcement>,
    cgroup: Option<CgroupPlan>,
}

impl ExecHandle {
    fn recorded_exit(&self) -> Option<TaskExit> {
        read_json::<ExitRecord>(&self.dir.join(EXIT_FILE))
            .unwrap_or_else(|e| {
                Some(ExitRecord {
                    code: None,
                    signal: None,
                    error: Some(format!("unreadable {EXIT_FILE}: {e}")),
                    finished_at_ms: 0,
                })
            })
            .map(|r| r.exit())
    }

    fn workload(&self) -> Option<WorkloadRecord> {
        read_json(&self.dir.join(WORKLOAD_FILE)).ok().flatten()
    }

    fn supervisor_alive(&self) -> bool {
        if let Some(child) = self.child.lock().expect("child lock").as_mut() {
            match child.try_wait() {
                Ok(Some(_)) => return false,
                Ok(None) => return true,
                Err(_) => {}
            }
        }
        self.supervisor.is_alive()
    }

    /// Kills the workload's process group when its supervisor is gone but the
    /// workload (the very process recorded) still runs.
    fn kill_orphan(&self) {
        if let Some(w) = self.workload() {
            if w.process.is_alive() {
                let _ = killpg(Pid::from_raw(w.process.pid), Signal::SIGKILL);
            }
        }
    }

    fn remove_cgroup_blocking(&self) {
        if let Some(plan) = &self.cgroup {
            if let Err(e) = cgroup::remove(&plan.dir) {
                tracing::warn!(cgroup = %plan.dir.display(), error = %e, "cannot remove cgroup");
            }
        }
    }

    async fn remove_cgroup(&self) {
        if let Some(plan) = self.cgroup.clone() {
            let _ = tokio::task::spawn_blocking(move || cgroup::remove(&plan.dir)).await;
        }
    }

    /// Waits until the new supervisor has spawned the workload (or recorded why it
    /// could not).
    async fn await_workload(&self) -> Result<(), DriverError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(workload) = self.workload() {
                *self.limits.lock().expect("limits lock") = workload.limits;
                return Ok(());
            }
            if self.dir.join(EXIT_FILE).exists() {
                return Ok(());
            }
            if !self.supervisor_alive() {
                if self.dir.join(EXIT_FILE).exists() {
                    return Ok(());
                }
                let log = fs::read_to_string(self.dir.join(SUPERVISOR_LOG)).unwrap_or_default();
                let last = log.lines().last().unwrap_or("no output").trim().to_owned();
                return Err(DriverError::Start(format!(
                    "the supervisor exited before starting the workload: {last}"
                )));
            }
            if Instant::now() >= deadline {
                self.stop_now(Duration::ZERO).await;
                return Err(DriverError::Start(format!(
                    "the supervisor did not start the workload within {}s",
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// True once the run is over: its exit is recorded, or nothing of it is left.
    fn is_over(&self) -> bool {
        self.dir.join(EXIT_FILE).exists()
            || (!self.supervisor_alive() && !self.workload().is_some_and(|w| w.process.is_alive()))
    }

    async fn wait_over(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_over() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop_now(&self, grace: Duration) {
        if self.is_over() {
            self.remove_cgroup().await;
            return;
        }
        let supervisor = Pid::from_raw(self.supervisor.pid);
        if self.supervisor_alive() {
            let _ = kill(supervisor, Signal::SIGTERM);
        } else if let Some(w) = self.workload().filter(|w| w.process.is_alive()) {
            let _ = killpg(Pid::from_raw(w.process.pid), Signal::SIGTERM);
        }
        if !self.wait_over(grace).await {
            // The grace period is over: the whole group goes, then the supervisor
            // gets a moment to record the exit.
            if let Some(w) = self.workload() {
                if self.supervisor_alive() || w.process.is_alive() {
                    let _ = killpg(Pid::from_raw(w.process.pid), Signal::SIGKILL);
                }
            }
            if !self.wait_over(RECORD_TIMEOUT).await && self.supervisor_alive() {
                let _ = kill(supervisor, Signal::SIGKILL);
                self.wait_over(RECORD_TIMEOUT).await;
            }
        }
        self.remove_cgroup().await;
    }
}

impl TaskHandle for ExecHandle {
    fn limits(&self) -> LimitsEnforcement {
        *self.limits.lock().expect("limits lock")
    }

    fn wait(&self) -> BoxFuture<'_, TaskExit> {
        Box::pin(async move {
            loop {
                if let Some(exit) = self.recorded_exit() {
                    // The supervisor exits right after recording; a child of ours
                    // is reaped by tokio once the handle is dropped.
                    self.remove_cgroup().await;
                    return exit;
                }
                if !self.supervisor_alive() {
                    // It may have recorded the exit just before it went.
                    if let Some(exit) = self.recorded_exit() {
                        self.remove_cgroup().await;
                        return exit;
                    }
                    self.kill_orphan();
                    self.remove_cgroup().await;
                    return TaskExit::Error(LOST.into());
                }
                tokio::time::sleep(POLL).await;
            }
        })
    }

    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Written before any signal, unless the run is already over: however
            // it ends from here, a later agent knows the stop ended it, not the
            // workload finishing.
            if !self.is_over() {
                let marker = self.dir.join(STOP_FILE);
                if let Err(e) = write_json_atomic(&marker, &StopRecord::now()) {
                    tracing::warn!(path = %marker.display(), error = %e, "cannot record the stop");
                }
            }
            self.stop_now(grace).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(gpus: &[&str]) -> Allocation {
        crate::testkit::allocation("a-1", "run", gpus)
    }

    fn task(env: &[(&str, &str)]) -> ExecTask {
        ExecTask {
            command: "/bin/true".into(),
            args: vec![],
            env: env
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            artifacts: vec![],
            restart: Default::default(),
            kill_timeout_ms: None,
        }
    }

    fn agent(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn env_keeps_only_basics_and_no_agent_settings() {
        let env = workload_env(
            agent(&[
                ("PATH", "/opt/bin"),
                ("HOME", "/root"),
                ("AIGRID_JOIN_TOKEN", "secret"),
                ("AIGRID_SERVER", "http://ctl"),
                ("AWS_SECRET_ACCESS_KEY", "x"),
            ]),
            &alloc(&["GPU-a", "GPU-b"]),
            &task(&[("MODE", "prod")]),
            Path::new("/data/allocs/a-1/local"),
        );
        assert_eq!(env["PATH"], "/opt/bin");
        assert_eq!(env["HOME"], "/root");
        assert_eq!(env["MODE"], "prod");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "GPU-a,GPU-b");
        assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "GPU-a,GPU-b");
        assert_eq!(env["AIGRID_ALLOC_ID"], "a-1");
        assert_eq!(env["AIGRID_JOB_ID"], "j-1");
        assert_eq!(env["AIGRID_GROUP"], "train");
        assert_eq!(env["AIGRID_ALLOC_INDEX"], "2");
        assert_eq!(env["AIGRID_TASK_DIR"], "/data/allocs/a-1/local");
        assert!(!env.contains_key("AIGRID_JOIN_TOKEN"));
        assert!(!env.contains_key("AIGRID_SERVER"));
        assert!(!env.contains_key("AWS_SECRET_ACCESS_KEY"));
        assert!(!env.contains_key("LANG"));
    }

    #[test]
    fn cpu_tasks_see_no_gpu_and_cannot_pick_one() {
        let env = workload_env(
            agent(&[]),
            &alloc(&[]),
            &task(&[("CUDA_VISIBLE_DEVICES", "0,1,2,3")]),
            Path::new("/t"),
        );
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "");
        assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "");
    }

    #[test]
    fn alloc_ids_must_be_safe_path_segments() {
        let config = RunnerConfig::new(
            "/data".into(),
            crate::config::SupervisorLaunch {
                program: "/bin/false".into(),
                args: vec![],
            },
        );
        assert_eq!(
            alloc_dir(&config, &AllocId::new("5f1c-0a")).unwrap(),
            Path::new("/data/allocs/5f1c-0a")
        );
        for bad in ["", "..", "../etc", "a/b", ".hidden", "a b"] {
            assert!(alloc_dir(&config, &AllocId::new(bad)).is_err(), "{bad}");
        }
    }
}
