//! The workload sandbox: what keeps the AI circuit (the workloads this node runs)
//! away from the control circuit's credentials and from one another.
//!
//! Two layers, each reported on its own ([`Probe::protections`]):
//!
//! - **A uid per allocation.** When the agent runs as root, each allocation runs
//!   under its own uid and gid from [`UidRange`] (no supplementary groups), kept
//!   in the allocation's `task.json` so a restarted agent re-adopts it with the
//!   same uid. Only the allocation's own `local/`, `tmp/` and `secrets/` belong to
//!   it; the rest of the allocation directory (the supervisor's files, logs) and
//!   the agent's data dir stay root's. Model servers share one group, the range's
//!   first id, for the model cache they all fill.
//! - **Landlock.** Between fork and exec the workload is confined to an allow list
//!   ([`SandboxPlan`]): read and write in its own `local/` and `tmp/`, read in its
//!   `secrets/`, read and execute in the system's read-only directories, read in
//!   `/proc` and `/sys`, a few device nodes, and what the agent grants a task kind
//!   ([`Grants`]: a model server's program, cache and local store). Paths that hold
//!   credentials ([`protected_paths`]: the agent's data dir, the server's data dir,
//!   the user's aigrid config, `/etc/shadow`, ...) are carved out of every broad
//!   grant, so `/etc` is granted entry by entry when it holds one of them.
//!   Landlock is applied best-effort: a kernel without it runs workloads without a
//!   filesystem sandbox, and the agent says so.
//!
//! The agent decides the plan ([`plan`]) and writes it into `task.json`, which the
//! workload can neither read nor change; the supervisor applies it to the workload
//! alone ([`apply`]), so it can still write its logs and records.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::Mutex;

use aigrid_api::{AllocId, EnvVars, NodeProtections};
use serde::{Deserialize, Serialize};

pub(crate) mod apply;

/// The first id of the default workload range.
pub const DEFAULT_FIRST_UID: u32 = 200_000;
/// Ids in the default workload range.
pub const DEFAULT_UID_COUNT: u32 = 65_536;
/// The workload's own directory inside the allocation directory: its secrets.
pub const SECRETS_DIR: &str = "secrets";
/// The workload's private temporary directory inside the allocation directory.
pub const TMP_DIR: &str = "tmp";

/// Read-only system directories every workload may read and execute from.
const SYSTEM_EXEC: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];
/// Kernel views every workload may read: its own processes' state, CPU and device
/// topology. Other processes' sensitive entries stay closed: Landlock refuses
/// ptrace-mode access to processes outside the workload's domain.
const SYSTEM_READ: &[&str] = &["/proc", "/sys"];
/// Device nodes every workload may read and write.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];
/// Files and directories under the system directories that hold host secrets.
const HOST_SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/aigrid",
];

/// Uids (and the same gids) workloads run under when the agent is root:
/// `first` is the model servers' shared group, allocations take the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidRange {
    /// The first id.
    pub first: u32,
    /// How many ids, `first` included.
    pub count: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            first: DEFAULT_FIRST_UID,
            count: DEFAULT_UID_COUNT,
        }
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;

    /// `FIRST-LAST`, both included: `200000-265535`. At least two ids, none of
    /// them below 1000 (system accounts) and all below 2^31.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not FIRST-LAST (e.g. 200000-265535)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if first < 1000 || last <= first || last >= 1 << 31 {
            return Err(format!(
                "`{s}`: want 1000 <= FIRST < LAST < 2147483648 (the first id is the model servers' group)"
            ));
        }
        Ok(UidRange {
            first,
            count: last - first + 1,
        })
    }
}

impl UidRange {
    /// The group model servers share for the model cache.
    pub fn shared_gid(&self) -> u32 {
        self.first
    }

    /// The ids allocations may take.
    pub fn allocation_ids(&self) -> impl Iterator<Item = u32> {
        self.first.saturating_add(1)..self.first.saturating_add(self.count)
    }

    /// True when `uid` is one of the allocations' ids.
    pub fn contains(&self, uid: u32) -> bool {
        uid > self.first && uid - self.first < self.count
    }
}

/// What the sandbox is given beyond the agent's data dir.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Uids for allocations when the agent runs as root.
    pub uids: UidRange,
    /// Directories model servers may read (a local store's backends); never one
    /// holding or inside a protected path.
    pub model_reads: Vec<PathBuf>,
    /// Paths no workload may see besides the agent's data dir and the user's
    /// aigrid config dir (always protected): the server's data dir, for one.
    pub protected: Vec<PathBuf>,
}

/// What the agent grants one task beyond its own directory and the system; set by
/// the agent for a kind of task, never taken from a job's specification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// Files or directories it may read and execute (a model server's program).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<PathBuf>,
    /// Directories it may read (a local store's backends).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read: Vec<PathBuf>,
    /// Directories it may read and write, shared with the tasks of its kind (the
    /// model cache); made group-writable for [`UidRange::shared_gid`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<PathBuf>,
}

/// What the supervisor applies to one run of a workload (in `task.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxPlan {
    /// The uid to run under; `None`: the supervisor's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The gid to run under; `None`: the supervisor's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Drop every capability: a workload left with root's uid keeps none of root's
    /// powers.
    #[serde(default)]
    pub drop_capabilities: bool,
    /// The file-creation mask, when the task shares directories with its kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
    /// Read, write, create and remove beneath these.
    pub read_write: Vec<PathBuf>,
    /// Read and execute beneath these.
    pub read_exec: Vec<PathBuf>,
    /// Read beneath these.
    pub read_only: Vec<PathBuf>,
    /// Device nodes it may read, write and ioctl.
    pub devices: Vec<PathBuf>,
}

/// What the probe found on this node, once per agent.
#[derive(Debug, Clone)]
pub struct Probe {
    /// As reported to the control plane.
    pub protections: NodeProtections,
    /// The ids allocations run under, when each gets its own.
    pub uids: Option<UidRange>,
    /// Never visible to a workload.
    pub protected: Vec<PathBuf>,
}

/// The running kernel's Landlock ABI version, or why there is none.
pub fn landlock_abi() -> Result<u32, String> {
    apply::landlock_abi()
}

/// Finds what this node can enforce. When the agent is root it makes its data dir
/// and `allocs_dir` searchable (not listable) by other users, so an allocation's
/// uid can reach its own directory by name; when a directory above them is not
/// searchable, allocations share root's uid (without its capabilities).
pub fn probe(config: &SandboxConfig, data_dir: &Path, allocs_dir: &Path) -> Probe {
    let mut protections = NodeProtections::default();
    match landlock_abi() {
        Ok(abi) => protections.landlock_abi = Some(abi),
        Err(why) => protections.sandbox_reason = Some(why),
    }
    let uids = if !nix::unistd::geteuid().is_root() {
        protections.uid_reason = Some("agent not root".into());
        None
    } else {
        match reachable_by_others(data_dir, allocs_dir) {
            Ok(()) => Some(config.uids),
            Err(why) => {
                protections.uid_reason = Some(format!("root without capabilities: {why}"));
                None
            }
        }
    };
    protections.per_allocation_uid = uids.is_some();
    if protections.landlock_abi.is_none() || uids.is_none() {
        tracing::warn!(
            sandbox = %protections.summary(),
            "workloads on this node are not fully confined"
        );
    } else {
        tracing::info!(sandbox = %protections.summary(), "workloads are sandboxed");
    }
    Probe {
        protections,
        uids,
        protected: protected_paths(config, data_dir),
    }
}

/// When this process runs as root, makes `dir` (created if missing) mode 0711:
/// other users (allocations' uids) may pass through it by name but not list it.
/// A directory above an agent's data dir needs this for allocations to get uids
/// of their own; `aigrid up` does it to its data dir.
pub fn make_searchable(dir: &Path) -> io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
}

/// Every path no workload may see: the agent's data dir, the configured ones, the
/// user's aigrid config dir and the host's own secrets.
pub fn protected_paths(config: &SandboxConfig, data_dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![data_dir.to_owned()];
    out.extend(config.protected.iter().cloned());
    if let Some(dir) = dirs::config_dir() {
        out.push(dir.join("aigrid"));
    }
    out.extend(HOST_SECRETS.iter().map(PathBuf::from));
    out.into_iter().map(|p| canonical(&p)).collect()
}

/// Makes `data_dir` and `allocs_dir` mode 0711 and checks that every directory
/// above them lets other users through.
fn reachable_by_others(data_dir: &Path, allocs_dir: &Path) -> Result<(), String> {
    for dir in [data_dir, allocs_dir] {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("cannot make {} searchable: {e}", dir.display()))?;
    }
    let data_dir = canonical(data_dir);
    for dir in data_dir.ancestors().skip(1) {
        let mode = fs::metadata(dir)
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "{} is not searchable by other users (chmod o+x, or another --data-dir)",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// `path` with symbolic links resolved where it exists, else as given.
fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_owned())
}

/// `path` granted broadly, minus every protected path: the path itself when no
/// protected path lies inside it, nothing when it lies inside one, else its
/// entries one by one, each treated the same way.
pub fn carve(path: &Path, protected: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(path) = fs::canonicalize(path) else {
        return Vec::new();
    };
    if protected.iter().any(|p| path.starts_with(p)) {
        return Vec::new();
    }
    if !protected.iter().any(|p| p.starts_with(&path)) {
        return vec![path];
    }
    let Ok(entries) = fs::read_dir(&path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let child = entry.path();
        // A link inside is granted by what it points at, checked the same way.
        out.extend(carve(&child, protected));
    }
    out.sort();
    out
}

/// What one allocation's run looks like on disk.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<data_dir>/allocs/<id>`.
    pub alloc_dir: PathBuf,
    /// `local/`: the task's working directory, its own.
    pub local: PathBuf,
    /// `tmp/`: its private temporary directory.
    pub tmp: PathBuf,
    /// `secrets/`: one file per secret, readable by it alone.
    pub secrets: PathBuf,
}

impl Layout {
    /// The layout of the allocation directory `alloc_dir`.
    pub fn new(alloc_dir: &Path, local: &str) -> Self {
        Layout {
            alloc_dir: alloc_dir.to_owned(),
            local: alloc_dir.join(local),
            tmp: alloc_dir.join(TMP_DIR),
            secrets: alloc_dir.join(SECRETS_DIR),
        }
    }
}

/// The uid and gid a run takes: its own uid with the same gid, or the shared
/// group for tasks that share directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The uid.
    pub uid: u32,
    /// The gid.
    pub gid: u32,
}

/// The plan for one run: the task's own directories, the system, its grants.
pub fn plan(
    layout: &Layout,
    owner: Option<Owner>,
    grants: &Grants,
    gpus: bool,
    protected: &[PathBuf],
) -> SandboxPlan {
    let broad = |paths: &mut dyn Iterator<Item = PathBuf>| -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = paths.flat_map(|p| carve(&p, protected)).collect();
        out.dedup();
        out
    };
    let mut read_write = vec![layout.local.clone(), layout.tmp.clone()];
    read_write.extend(grants.shared.iter().cloned());
    let read_exec = broad(
        &mut SYSTEM_EXEC
            .iter()
            .map(PathBuf::from)
            .chain(grants.exec.iter().cloned()),
    );
    let mut read_only = broad(
        &mut SYSTEM_READ
            .iter()
            .map(PathBuf::from)
            .chain(grants.read.iter().cloned()),
    );
    read_only.push(layout.secrets.clone());
    let mut devices: Vec<PathBuf> = DEVICES.iter().map(PathBuf::from).collect();
    if gpus {
        devices.extend(nvidia_devices());
    }
    SandboxPlan {
        uid: owner.map(|o| o.uid),
        gid: owner.map(|o| o.gid),
        drop_capabilities: owner.is_none() && nix::unistd::geteuid().is_root(),
        umask: (!grants.shared.is_empty()).then_some(0o007),
        read_write,
        read_exec,
        read_only,
        devices,
    }
}

/// `/dev/nvidia*`: the driver's control, memory and per-GPU nodes.
fn nvidia_devices() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/dev") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("nvidia"))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Creates the allocation directory (root's, searchable) and the task's own
/// `local/` and `tmp/` (the owner's, private).
pub fn make_dirs(layout: &Layout, owner: Option<Owner>) -> io::Result<()> {
    fs::create_dir_all(&layout.alloc_dir)?;
    fs::set_permissions(&layout.alloc_dir, fs::Permissions::from_mode(0o711))?;
    for dir in [&layout.local, &layout.tmp] {
        fs::create_dir_all(dir)?;
        if let Some(o) = owner {
            std::os::unix::fs::chown(dir, Some(o.uid), Some(o.gid))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// True for a variable name that can be a file name as it is.
pub fn secret_file_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Writes each of the task's variables to `secrets/<NAME>`, mode 0400, owned by
/// the run's owner, in a directory of mode 0500 that is the owner's too; what an
/// earlier run left is removed first. Names that cannot be file names are left
/// to the environment alone, and returned.
pub fn write_secrets(dir: &Path, env: &EnvVars, owner: Option<Owner>) -> io::Result<Vec<String>> {
    remove_secrets(dir)?;
    fs::create_dir(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let mut skipped = Vec::new();
    for (name, value) in env {
        if !secret_file_name(name) {
            skipped.push(name.clone());
            continue;
        }
        let path = dir.join(name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)?;
        file.write_all(value.as_bytes())?;
        file.sync_all()?;
        if let Some(o) = owner {
            std::os::unix::fs::fchown(&file, Some(o.uid), Some(o.gid))?;
        }
    }
    if let Some(o) = owner {
        std::os::unix::fs::chown(dir, Some(o.uid), Some(o.gid))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o500))?;
    Ok(skipped)
}

/// Removes a secrets directory (its mode keeps even its owner from deleting
/// entries until it is opened up).
pub fn remove_secrets(dir: &Path) -> io::Result<()> {
    match fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    }
    fs::remove_dir_all(dir)
}

/// Makes `dir` a directory the tasks of group `gid` share: the agent's, group
/// `gid`, mode 2770 (new entries keep the group). One that is not yet the
/// group's (a model cache filled before allocations had uids) is emptied first:
/// it is a cache, every chunk is fetched and verified again, and nothing in it is
/// ever handed over by following a path a workload could have changed.
pub fn make_shared(dir: &Path, gid: u32) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() && meta.gid() == gid => {}
        Ok(meta) => {
            if meta.is_dir() {
                fs::remove_dir_all(dir)?;
            } else {
                fs::remove_file(dir)?;
            }
            fs::create_dir_all(dir)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dir)?,
        Err(e) => return Err(e),
    }
    std::os::unix::fs::chown(dir, None, Some(gid))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o2770))
}

/// Which allocation holds which uid on this node. Filled from the `task.json`
/// files a restarted agent finds, so each allocation keeps its uid for life.
#[derive(Debug, Default)]
pub struct UidTable {
    held: Mutex<BTreeMap<AllocId, u32>>,
}

impl UidTable {
    /// Records that `id` holds `uid` (found on disk).
    pub fn adopt(&self, id: &AllocId, uid: u32) {
        self.lock().insert(id.clone(), uid);
    }

    /// The uid `id` holds, or the lowest one of `range` that no allocation holds
    /// and no process runs under; `None` when the range is spent.
    pub fn take(&self, id: &AllocId, range: UidRange, busy: impl Fn(u32) -> bool) -> Option<u32> {
        let mut held = self.lock();
        if let Some(uid) = held.get(id) {
            return Some(*uid);
        }
        let taken: std::collections::BTreeSet<u32> = held.values().copied().collect();
        let uid = range
            .allocation_ids()
            .find(|uid| !taken.contains(uid) && !busy(*uid))?;
        held.insert(id.clone(), uid);
        Some(uid)
    }

    /// Gives `id`'s uid back.
    pub fn release(&self, id: &AllocId) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AllocId, u32>> {
        self.held.lock().expect("uid table lock")
    }
}

/// Whether any process runs under `uid` (a workload of an allocation that held
/// it and left something behind); such a uid is not handed out again.
pub fn uid_busy(uid: u32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
            && e.metadata().is_ok_and(|m| m.uid() == uid)
    })
}

#[cfg(test)]
mod tests;
