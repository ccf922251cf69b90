//! The per-allocation supervisor process (`aigrid supervise <alloc_dir>`) and the
//! files through which it and the agent talk.
//!
//! The agent starts one supervisor per run of a workload, detached in its own
//! session, so the workload outlives agent restarts and upgrades (the Nomad executor
//! pattern). The supervisor spawns the workload in its own process group inside the
//! allocation's cgroup, copies its output into rotating logs, forwards SIGTERM to the
//! group, and records how the workload ended in `exit.json`, which is how an exit
//! code survives an agent that was not running at the time. Everything is plain
//! files in the allocation directory:
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `task.json` | agent | what to run: [`TaskFile`] |
//! | `supervisor.json` | supervisor | its pid and `/proc` start time |
//! | `workload.json` | supervisor | the workload's pid, process group and limits |
//! | `exit.json` | supervisor | how the workload ended (atomically, last) |
//! | `supervisor.log` | supervisor | its own diagnostics |
//! | `logs/` | supervisor | `stdout.log`, `stderr.log` and their rotations |
//! | `local/` | agent | the task's working directory and artifacts; the workload's own |
//! | `tmp/` | agent | the workload's private temporary directory, its own |
//! | `secrets/` | agent | one file per variable of the task, readable by the workload alone |
//!
//! Everything but `local/`, `tmp/` and `secrets/` is the agent's (mode 0600 or
//! 0700): the workload runs under the [`SandboxPlan`] in `task.json`, which
//! neither its uid nor its Landlock domain lets it read or change.
//!
//! The supervisor is synchronous (std threads, no async runtime): it must not live
//! inside the agent's runtime, and it has little to do.

// Unsafe: a `pre_exec` hook that clears the signal mask between fork and exec.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aigrid_api::{Allocation, ExecTask, LimitsEnforcement};
use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::Pid;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::cgroup::{self, CgroupPlan};
use crate::driver::TaskExit;
use crate::logs::RotatingFile;
use crate::sandbox::{self, Grants, SandboxPlan};

/// What to run (agent → supervisor).
pub(crate) const TASK_FILE: &str = "task.json";
/// The supervisor's identity.
pub(crate) const SUPERVISOR_FILE: &str = "supervisor.json";
/// The workload's identity and limits.
pub(crate) const WORKLOAD_FILE: &str = "workload.json";
/// How the workload ended.
pub(crate) const EXIT_FILE: &str = "exit.json";
/// Present when the agent asked the run to stop: its exit is the stop's doing,
/// not the workload finishing.
pub(crate) const STOP_FILE: &str = "stop.json";
/// The supervisor's own stdout and stderr.
pub(crate) const SUPERVISOR_LOG: &str = "supervisor.log";
/// The task's working directory.
pub(crate) const LOCAL_DIR: &str = "local";
/// The workload's output.
pub(crate) const LOGS_DIR: &str = "logs";
/// Standard output's log, inside [`LOGS_DIR`].
pub(crate) const STDOUT_LOG: &str = "stdout.log";
/// Standard error's log, inside [`LOGS_DIR`].
pub(crate) const STDERR_LOG: &str = "stderr.log";

/// How long the supervisor waits for the output of a workload that exited to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// `task.json`: everything the supervisor needs, plus what the agent needs to pick
/// the allocation up again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TaskFile {
    /// The allocation, as the agent last saw it.
    pub alloc: Allocation,
    /// The task, for its restart policy and kill timeout.
    pub task: ExecTask,
    /// In-place restarts so far, including this run.
    pub restarts: u32,
    /// The program.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: BTreeMap<String, String>,
    /// The working directory.
    pub cwd: PathBuf,
    /// The cgroup to run in, when this node enforces limits.
    pub cgroup: Option<CgroupPlan>,
    /// Size of one log file before it rotates.
    pub log_max_bytes: u64,
    /// Rotated files kept per stream.
    pub log_max_files: u32,
    /// Where the workload serves, for the agent to report again after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// What the agent granted the task's kind, for a restarted agent.
    #[serde(default)]
    pub grants: Grants,
    /// The uid, gid and Landlock rules the workload runs under; absent in files
    /// of agents that predate them (run as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxPlan>,
}

/// A process identified beyond its pid: a pid is reused after its process is gone,
/// the pair (pid, start time since boot) is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcessRecord {
    /// The process id.
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcessRecord {
    /// The record of the live process `pid`.
    pub fn of(pid: i32) -> Option<Self> {
        let (_, start_time) = proc_stat(pid)?;
        Some(ProcessRecord { pid, start_time })
    }

    /// True while this very process runs (not a zombie, not a newer process that
    /// got the same pid).
    pub fn is_alive(&self) -> bool {
        matches!(
            proc_stat(self.pid),
            Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X'
        )
    }
}

/// State and start time of process `pid`, from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

/// `workload.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkloadRecord {
    /// The workload process; its pid is also its process group id.
    pub process: ProcessRecord,
    /// Whether it runs inside its cgroup with limits.
    pub limits: LimitsEnforcement,
    /// Why not, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits_reason: Option<String>,
    /// What confines it: `landlock fully enforced, uid 200001`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// `exit.json`: exactly one of `code`, `signal` and `error` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExitRecord {
    /// The exit code, when the workload exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Why it never ran (the command could not be started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the supervisor saw it end, in milliseconds since the Unix epoch.
    pub finished_at_ms: u64,
}

impl ExitRecord {
    fn new(exit: TaskExit) -> Self {
        let finished_at_ms = now_ms();
        let mut record = ExitRecord {
            code: None,
            signal: None,
            error: None,
            finished_at_ms,
        };
        match exit {
            TaskExit::Code(code) => record.code = Some(code),
            TaskExit::Signal(signal) => record.signal = Some(signal),
            TaskExit::Error(error) => record.error = Some(error),
        }
        record
    }

    /// How the workload ended.
    pub fn exit(&self) -> TaskExit {
        match (self.code, self.signal, &self.error) {
            (Some(code), _, _) => TaskExit::Code(code),
            (None, Some(signal), _) => TaskExit::Signal(signal),
            (None, None, Some(error)) => TaskExit::Error(error.clone()),
            (None, None, None) => TaskExit::Error("exit record is empty".into()),
        }
    }
}

/// `stop.json`: when the agent asked the run to stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StopRecord {
    /// When the stop was asked for, in milliseconds since the Unix epoch.
    pub requested_at_ms: u64,
}

impl StopRecord {
    pub fn now() -> Self {
        StopRecord {
            requested_at_ms: now_ms(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes `value` as JSON so that readers see the old file or the whole new one,
/// and the new one survives a power loss once this returns. The file is readable
/// by its writer alone (`task.json` holds the task's secrets).
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    serde_json::to_writer(&mut file, value)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The supervisor's entry point: supervises the workload described by
/// `<alloc_dir>/task.json` until it exits. Must be called before any other thread
/// starts (it blocks termination signals for the whole process) and outside any
/// async runtime.
pub fn run(alloc_dir: &Path) -> ExitCode {
    match supervise(alloc_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aigrid supervise: {e}");
            // Tell the agent why, unless the workload's own exit is already recorded.
            let exit_path = alloc_dir.join(EXIT_FILE);
            if !exit_path.exists() {
                let record = ExitRecord::new(TaskExit::Error(format!("supervisor: {e}")));
                let _ = write_json_atomic(&exit_path, &record);
            }
            ExitCode::FAILURE
        }
    }
}

fn supervise(dir: &Path) -> Result<(), String> {
    // Blocked in every thread from here on; one thread takes them with sigwait.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals
        .thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;

    let me = ProcessRecord::of(std::process::id() as i32)
        .ok_or("cannot read this process's start time")?;
    write_json_atomic(&dir.join(SUPERVISOR_FILE), &me)
        .map_err(|e| format!("cannot write {SUPERVISOR_FILE}: {e}"))?;
    let task: TaskFile = read_json(&dir.join(TASK_FILE))
        .map_err(|e| format!("cannot read {TASK_FILE}: {e}"))?
        .ok_or_else(|| format!("{TASK_FILE} is missing"))?;

    let (limits, limits_reason) = match &task.cgroup {
        None => (LimitsEnforcement::NotEnforced, None),
        Some(plan) => match cgroup::enter(plan) {
            Ok(()) => (LimitsEnforcement::Enforced, None),
            Err(e) => {
                let reason = format!("cannot enter cgroup {}: {e}", plan.dir.display());
                eprintln!("aigrid supervise: {reason}; running without limits");
                (LimitsEnforcement::NotEnforced, Some(reason))
            }
        },
    };
    let cgroup = task
        .cgroup
        .as_ref()
        .filter(|_| limits == LimitsEnforcement::Enforced);

    let logs = dir.join(LOGS_DIR);
    fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let open_log = |name: &str| {
        RotatingFile::open(&logs.join(name), task.log_max_bytes, task.log_max_files)
            .map_err(|e| format!("cannot open {name}: {e}"))
    };
    let stdout_log = open_log(STDOUT_LOG)?;
    let stderr_log = open_log(STDERR_LOG)?;

    let term = Arc::new(AtomicBool::new(false));
    let pgid = Arc::new(AtomicI32::new(0));
    spawn_signal_forwarder(signals, term.clone(), pgid.clone());

    let mut command = Command::new(&task.command);
    let umask = task.sandbox.as_ref().and_then(|s| s.umask);
    command
        .args(&task.args)
        .env_clear()
        .envs(&task.env)
        .current_dir(&task.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: only async-signal-safe calls (sigprocmask, umask) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if let Some(mask) = umask {
                libc::umask(mask as libc::mode_t);
            }
            SigSet::empty().thread_set_mask().map_err(io::Error::from)
        });
    }
    let spawned = match &task.sandbox {
        Some(plan) => sandbox::apply::spawn(command, plan).map(|(c, s)| (c, Some(s))),
        None => command
            .spawn()
            .map(|c| (c, None))
            .map_err(|e| e.to_string()),
    };
    let (mut child, confined) = match spawned {
        Ok(spawned) => spawned,
        Err(e) => {
            let error = format!("cannot start `{}`: {e}", task.command);
            eprintln!("aigrid supervise: {error}");
            finish(dir, TaskExit::Error(error), cgroup)?;
            return Ok(());
        }
    };
    let workload_pid = child.id() as i32;
    pgid.store(workload_pid, Ordering::SeqCst);
    if term.load(Ordering::SeqCst) {
        let _ = killpg(Pid::from_raw(workload_pid), Signal::SIGTERM);
    }
    let record = WorkloadRecord {
        process: ProcessRecord::of(workload_pid).unwrap_or(ProcessRecord {
            pid: workload_pid,
            start_time: 0,
        }),
        limits,
        limits_reason,
        sandbox: confined,
    };
    if let Err(e) = write_json_atomic(&dir.join(WORKLOAD_FILE), &record) {
        eprintln!("aigrid supervise: cannot write {WORKLOAD_FILE}: {e}");
    }

    let (drained_tx, drained_rx) = mpsc::channel();
    let streams: [(Box<dyn Read + Send>, RotatingFile); 2] = [
        (Box::new(child.stdout.take().expect("piped")), stdout_log),
        (Box::new(child.stderr.take().expect("piped")), stderr_log),
    ];
    for (from, log) in streams {
        let done = drained_tx.clone();
        std::thread::spawn(move || {
            copy_output(from, log);
            let _ = done.send(());
        });
    }
    drop(drained_tx);

    let status = loop {
        match child.wait() {
            Ok(status) => break status,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot wait for the workload: {e}")),
        }
    };
    pgid.store(0, Ordering::SeqCst);
    // What the workload left behind in its group ends with it.
    let _ = killpg(Pid::from_raw(workload_pid), Signal::SIGKILL);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if drained_rx.recv_timeout(left).is_err() {
            break;
        }
    }

    use std::os::unix::process::ExitStatusExt;
    let exit = match (status.code(), status.signal()) {
        (Some(code), _) => TaskExit::Code(code),
        (None, Some(signal)) => TaskExit::Signal(signal),
        (None, None) => TaskExit::Error(format!("ended with unknown status {status}")),
    };
    finish(dir, exit, cgroup)
}

/// Records the exit, then gives the allocation's cgroup back.
fn finish(dir: &Path, exit: TaskExit, cgroup: Option<&CgroupPlan>) -> Result<(), String> {
    write_json_atomic(&dir.join(EXIT_FILE), &ExitRecord::new(exit))
        .map_err(|e| format!("cannot write {EXIT_FILE}: {e}"))?;
    if let Some(plan) = cgroup {
        if let Err(e) = cgroup::leave_and_remove(plan) {
            eprintln!(
                "aigrid supervise: cannot remove cgroup {}: {e}",
                plan.dir.display()
            );
        }
    }
    Ok(())
}

/// Waits for termination signals and passes SIGTERM on to the workload's process
/// group; the agent, not the supervisor, escalates to SIGKILL after the grace period.
fn spawn_signal_forwarder(signals: SigSet, term: Arc<AtomicBool>, pgid: Arc<AtomicI32>) {
    std::thread::spawn(move || {
        while signals.wait().is_ok() {
            term.store(true, Ordering::SeqCst);
            let group = pgid.load(Ordering::SeqCst);
            if group > 0 {
                let _ = killpg(Pid::from_raw(group), Signal::SIGTERM);
            }
        }
    });
}

/// Copies one output stream into its log until the workload closes it. A log that
/// cannot be written is reported once and the stream is still drained, so the
/// workload never blocks on a full pipe.
fn copy_output(mut from: Box<dyn Read + Send>, mut log: RotatingFile) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut failed = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if let Err(e) = log.write_all(&buf[..n]) {
            if !failed {
                eprintln!("aigrid supervise: cannot write the workload's log: {e}");
                failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessRecord::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        let reused = ProcessRecord {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_alive());
        assert!(ProcessRecord::of(0).is_none());
    }

    #[test]
    fn exit_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EXIT_FILE);
        assert!(read_json::<ExitRecord>(&path).unwrap().is_none());
        for exit in [
            TaskExit::Code(3),
            TaskExit::Signal(9),
            TaskExit::Error("cannot start `x`".into()),
        ] {
            write_json_atomic(&path, &ExitRecord::new(exit.clone())).unwrap();
            let back: ExitRecord = read_json(&path).unwrap().unwrap();
            assert_eq!(back.exit(), exit);
        }
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [EXIT_FILE], "no temporary file is left behind");
    }
}
