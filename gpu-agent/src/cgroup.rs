//! CPU and memory limits through cgroup v2.
//!
//! The agent probes once whether it can enforce limits: a cgroup v2 hierarchy must
//! be mounted with the `cpu` and `memory` controllers available at its root, and the
//! agent must be able to delegate them to an `aigrid` group there (the way Nomad
//! uses `nomad.slice`). Each allocation then gets `aigrid/<alloc-id>` with
//! `memory.max` and `cpu.max`; its supervisor moves itself in before it spawns the
//! workload, so the workload is born inside. When anything is missing the node runs
//! workloads anyway and reports their limits as not enforced.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aigrid_api::{LimitsEnforcement, MemoryMib, MilliCpu};
use serde::{Deserialize, Serialize};

/// Where the kernel says which cgroup hierarchies are mounted.
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// The group under the hierarchy root that holds one group per allocation.
const GROUP: &str = "aigrid";
/// `cpu.max` period, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// Smallest quota the kernel accepts, in microseconds.
const MIN_CPU_QUOTA_US: u64 = 1_000;

/// The outcome of probing the node's cgroup support.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Whether allocations' limits will be enforced.
    pub enforcement: LimitsEnforcement,
    /// Why not, when they will not.
    pub reason: Option<String>,
    /// The cgroup v2 mount point, when limits are enforced.
    pub root: Option<PathBuf>,
}

impl Probe {
    fn not_enforced(reason: String) -> Self {
        Probe {
            enforcement: LimitsEnforcement::NotEnforced,
            reason: Some(reason),
            root: None,
        }
    }

    /// The cgroup an allocation's supervisor and workload run in, with its limits;
    /// `None` when limits are not enforced on this node.
    pub fn plan(&self, alloc_id: &str, cpu: MilliCpu, memory: MemoryMib) -> Option<CgroupPlan> {
        let root = self.root.as_ref()?;
        Some(CgroupPlan {
            root: root.clone(),
            dir: root.join(GROUP).join(alloc_id),
            memory_max: memory_max(memory),
            cpu_max: cpu_max(cpu),
        })
    }
}

/// One allocation's cgroup: where it is and what it limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupPlan {
    /// The hierarchy root; the supervisor moves itself back there before removing
    /// `dir` (the root is the one group exempt from the no-internal-processes rule).
    pub root: PathBuf,
    /// The allocation's group.
    pub dir: PathBuf,
    /// `memory.max`, in bytes.
    pub memory_max: u64,
    /// `cpu.max`: `"<quota> <period>"` in microseconds.
    pub cpu_max: String,
}

/// `memory.max` for a reservation of `memory`.
pub fn memory_max(memory: MemoryMib) -> u64 {
    memory.get().saturating_mul(1024 * 1024)
}

/// `cpu.max` for a reservation of `cpu`: 1000 millicores is one full period.
pub fn cpu_max(cpu: MilliCpu) -> String {
    let quota = cpu.get().saturating_mul(CPU_PERIOD_US / 1000);
    format!("{} {CPU_PERIOD_US}", quota.max(MIN_CPU_QUOTA_US))
}

/// Probes this node: reads the mount table, checks the controllers and sets up the
/// `aigrid` group. Never fails; what goes wrong becomes the reason.
pub fn probe() -> Probe {
    match fs::read_to_string(MOUNTINFO) {
        Ok(mountinfo) => probe_mount(cgroup2_mount(&mountinfo)),
        Err(e) => Probe::not_enforced(format!("cannot read {MOUNTINFO}: {e}")),
    }
}

fn probe_mount(mount: Option<PathBuf>) -> Probe {
    let Some(root) = mount else {
        return Probe::not_enforced("no cgroup v2 hierarchy is mounted".into());
    };
    match delegate(&root) {
        Ok(()) => Probe {
            enforcement: LimitsEnforcement::Enforced,
            reason: None,
            root: Some(root),
        },
        Err(reason) => Probe::not_enforced(format!("cgroup v2 at {}: {reason}", root.display())),
    }
}

/// Makes `cpu` and `memory` available to allocation groups under `<root>/aigrid`.
fn delegate(root: &Path) -> Result<(), String> {
    let available = read_list(&root.join("cgroup.controllers"))?;
    let missing: Vec<&str> = ["cpu", "memory"]
        .into_iter()
        .filter(|c| !available.iter().any(|a| a == c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the {} controller{} {} not available",
            missing.join(", "),
            if missing.len() == 1 { "" } else { "s" },
            if missing.len() == 1 { "is" } else { "are" },
        ));
    }
    enable_controllers(root)?;
    let group = root.join(GROUP);
    fs::create_dir_all(&group).map_err(|e| format!("cannot create {}: {e}", group.display()))?;
    enable_controllers(&group)
}

fn enable_controllers(dir: &Path) -> Result<(), String> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = read_list(&path)?;
    if ["cpu", "memory"]
        .iter()
        .all(|c| enabled.iter().any(|e| e == c))
    {
        return Ok(());
    }
    fs::write(&path, "+cpu +memory")
        .map_err(|e| format!("cannot enable cpu and memory in {}: {e}", path.display()))
}

fn read_list(path: &Path) -> Result<Vec<String>, String> {
    fs::read_to_string(path)
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The mount point of the first cgroup v2 hierarchy in a `/proc/self/mountinfo`
/// text (on hybrid setups it sits beside the v1 ones, e.g. `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// Mount points escape space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(code) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates the allocation's group, sets its limits and moves the calling process
/// into it. Run by the supervisor before it spawns the workload.
pub fn enter(plan: &CgroupPlan) -> io::Result<()> {
    fs::create_dir_all(&plan.dir)?;
    fs::write(plan.dir.join("memory.max"), plan.memory_max.to_string())?;
    fs::write(plan.dir.join("cpu.max"), &plan.cpu_max)?;
    fs::write(
        plan.dir.join("cgroup.procs"),
        std::process::id().to_string(),
    )
}

/// Moves the calling process back to the hierarchy root and removes the
/// allocation's group. The kernel frees a group only once its last process is
/// gone, which can lag a killed process's exit, so removal is retried briefly.
pub fn leave_and_remove(plan: &CgroupPlan) -> io::Result<()> {
    // Failing to move out only means the removal below fails too.
    let _ = fs::write(
        plan.root.join("cgroup.procs"),
        std::process::id().to_string(),
    );
    remove(&plan.dir)
}

/// Removes an allocation's group once it holds no process; a missing group is
/// already removed.
pub fn remove(dir: &Path) -> io::Result<()> {
    let mut attempt = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) if attempt < 20 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_unified_mount() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let escaped = "41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(escaped), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            cgroup2_mount(&HYBRID.lines().take(2).collect::<Vec<_>>().join("\n")),
            None
        );
    }

    #[test]
    fn limits_are_written_in_kernel_units() {
        assert_eq!(cpu_max(MilliCpu::new(1000)), "100000 100000");
        assert_eq!(cpu_max(MilliCpu::new(2500)), "250000 100000");
        assert_eq!(cpu_max(MilliCpu::new(1)), "1000 100000");
        assert_eq!(memory_max(MemoryMib::new(512)), 512 * 1024 * 1024);
    }

    #[test]
    fn missing_mount_or_controllers_is_not_enforced() {
        let none = probe_mount(None);
        assert_eq!(none.enforcement, LimitsEnforcement::NotEnforced);
        assert!(none
            .plan("a", MilliCpu::new(1), MemoryMib::new(1))
            .is_none());

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "cpuset io pids\n").unwrap();
        let probe = probe_mount(Some(dir.path().to_owned()));
        assert_eq!(probe.enforcement, LimitsEnforcement::NotEnforced);
        let reason = probe.reason.unwrap();
        assert!(
            reason.contains("cpu, memory controllers are not available"),
            "{reason}"
        );
    }

    #[test]
    fn delegates_when_controllers_exist() {
        // A directory that looks like a cgroup v2 root stands in for the kernel.
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "cpu io memory pids").unwrap();
        fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        fs::create_dir(dir.path().join(GROUP)).unwrap();
        fs::write(dir.path().join(GROUP).join("cgroup.subtree_control"), "").unwrap();
        let probe = probe_mount(Some(dir.path().to_owned()));
        assert_eq!(probe.enforcement, LimitsEnforcement::Enforced, "{probe:?}");
        let plan = probe
            .plan("a1", MilliCpu::new(500), MemoryMib::new(64))
            .unwrap();
        assert_eq!(plan.dir, dir.path().join("aigrid/a1"));
        assert_eq!(plan.cpu_max, "50000 100000");
    }

    #[test]
    fn probing_this_machine_does_not_panic() {
        // On the development machine (a hybrid hierarchy without controllers) this
        // is NotEnforced with a reason; on a delegated cgroup v2 host, Enforced.
        let probe = probe();
        match probe.enforcement {
            LimitsEnforcement::NotEnforced => assert!(probe.reason.is_some()),
            LimitsEnforcement::Enforced => assert!(probe.root.is_some()),
        }
    }
}
