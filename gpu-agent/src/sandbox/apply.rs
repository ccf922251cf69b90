//! The supervisor's half of the sandbox: starts the workload under its plan.
//!
//! Landlock confines the thread that asks and what it forks, so the supervisor
//! starts the workload from a thread of its own that it confines first (and, for a
//! workload left with root's uid, strips of every capability); the supervisor's
//! other threads keep writing its logs and records where the workload cannot.
//! The uid and gid change happens in the forked child (`setgid`, `setgroups(0)`,
//! `setuid`, by `std`), before exec.

// Unsafe: the Landlock version query and capset are raw system calls.
#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use landlock::{
    make_bitflags, path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::SandboxPlan;

/// The Landlock ABI this code asks for; older kernels get what they support.
const ABI_WANTED: ABI = ABI::V7;

/// The running kernel's Landlock ABI version, or why there is none.
pub(crate) fn landlock_abi() -> Result<u32, String> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, zero size and the VERSION flag the
    // call reads and writes no memory; it only answers a number or an error.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0 as libc::size_t,
            libc::c_ulong::from(LANDLOCK_CREATE_RULESET_VERSION),
        )
    };
    if v > 0 {
        return Ok(u32::try_from(v).unwrap_or(u32::MAX));
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EOPNOTSUPP) => Err("Landlock is not enabled in this kernel".into()),
        _ => Err("kernel has no Landlock".into()),
    }
}

/// Starts `command` under `plan` and says what was enforced, e.g. `landlock
/// fully enforced, uid 200001`. Fails, without starting anything, when a
/// restriction that the kernel supports could not be put in place.
pub(crate) fn spawn(mut command: Command, plan: &SandboxPlan) -> Result<(Child, String), String> {
    if let Some(gid) = plan.gid {
        command.gid(gid);
    }
    if let Some(uid) = plan.uid {
        // std drops supplementary groups (setgroups(0)) before setuid when root.
        command.uid(uid);
    }
    let plan = plan.clone();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let landlock = restrict_this_thread(&plan)?;
                if plan.drop_capabilities {
                    drop_capabilities().map_err(|e| format!("cannot drop capabilities: {e}"))?;
                }
                let child = command.spawn().map_err(|e| e.to_string())?;
                let who = match (plan.uid, plan.drop_capabilities) {
                    (Some(uid), _) => format!("uid {uid}"),
                    (None, true) => "root's uid without capabilities".to_owned(),
                    (None, false) => "the agent's uid".to_owned(),
                };
                Ok((child, format!("{landlock}, {who}")))
            })
            .join()
            .unwrap_or_else(|_| Err("the sandboxing thread panicked".into()))
    })
}

/// Confines the calling thread (and what it forks from now on) to `plan`.
fn restrict_this_thread(plan: &SandboxPlan) -> Result<&'static str, String> {
    let abi = ABI_WANTED;
    let fail = |e: landlock::RulesetError| format!("cannot sandbox the workload: {e}");
    let read_only = make_bitflags!(AccessFs::{ReadFile | ReadDir});
    let device = make_bitflags!(AccessFs::{ReadFile | WriteFile | IoctlDev});
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail)?
        .scope(make_bitflags!(Scope::{AbstractUnixSocket | Signal}))
        .map_err(fail)?
        .create()
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            &plan.read_write,
            AccessFs::from_all(abi),
        ))
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            &plan.read_exec,
            AccessFs::from_read(abi),
        ))
        .map_err(fail)?
        .add_rules(path_beneath_rules(&plan.read_only, read_only))
        .map_err(fail)?
        .add_rules(path_beneath_rules(&plan.devices, device))
        .map_err(fail)?
        .restrict_self()
        .map_err(fail)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "landlock fully enforced",
        RulesetStatus::PartiallyEnforced => "landlock partially enforced",
        RulesetStatus::NotEnforced => "landlock not enforced (kernel has no Landlock)",
    })
}

/// Empties the calling thread's capability sets and bounding set, so that what
/// it forks and executes holds no capability even with uid 0.
fn drop_capabilities() -> io::Result<()> {
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments only; an unknown capability
        // answers EINVAL, which ends the known ones.
        let (cap, zero): (libc::c_ulong, libc::c_ulong) = (cap, 0);
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, zero, zero, zero) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: integer arguments only.
    unsafe {
        let zero: libc::c_ulong = 0;
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            zero,
            zero,
            zero,
        );
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: `header` and the two `data` entries are the layout capset(2) reads
    // for version 3, alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
