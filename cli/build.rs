//! Marks the sandbox tests that need root (a uid per allocation) or a kernel with
//! Landlock as skipped where this machine lacks them.
//!
//! `root_user` is set when the build runs with effective uid 0, `landlock` when the
//! kernel answers a Landlock ABI version. A test that needs them carries
//! `#[cfg_attr(not(..), ignore = "skipped: …")]`, so `cargo test` lists it as
//! `ignored, skipped: …` where it cannot run, and runs it (where it can fail)
//! everywhere else. Looked for on the machine that builds, so only when it is also
//! the one the tests run on (no cross-compiling); run as another user or on
//! another kernel, rebuild (`cargo clean -p aigrid`).

// Unsafe: the Landlock version query is a raw system call.
#![allow(unsafe_code)]

fn main() {
    println!("cargo::rustc-check-cfg=cfg(root_user)");
    println!("cargo::rustc-check-cfg=cfg(landlock)");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("HOST") != std::env::var_os("TARGET") {
        return;
    }
    if effective_uid() == Some(0) {
        println!("cargo::rustc-cfg=root_user");
    }
    if landlock_abi() > 0 {
        println!("cargo::rustc-cfg=landlock");
    }
}

/// The effective uid, from the `Uid:` line of `/proc/self/status`.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The kernel's Landlock ABI version; 0 or less without Landlock.
fn landlock_abi() -> i64 {
    // SAFETY: with a null attribute, size 0 and LANDLOCK_CREATE_RULESET_VERSION
    // (1) the call touches no memory and only answers a number.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    }
}
