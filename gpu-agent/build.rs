//! Marks the test that needs an NVIDIA driver as skipped where this machine has
//! none.
//!
//! `nvidia_driver` is set where the driver's library, `libnvidia-ml.so.1` (what
//! `nvml-wrapper` loads), is on the loader's path and its kernel module is loaded
//! (`/proc/driver/nvidia/version`, which GPU containers see too): CUDA packages
//! install the library on machines without a GPU, and `/dev/nvidiactl` can be
//! there without a loaded module, so neither says much alone. A test that needs
//! the driver carries `#[cfg_attr(not(nvidia_driver), ignore = "skipped: …")]`, so
//! `cargo test` lists it as `ignored, skipped: …` where it cannot run, and runs it
//! (where it can fail) everywhere else. Looked for on the machine that builds, so
//! only when it is also the one the tests run on (no cross-compiling); a driver
//! installed after a build is seen once the crate is built again
//! (`cargo clean -p aigrid-agent`).

use std::path::Path;
use std::process::Command;

const LIBRARY: &str = "libnvidia-ml.so.1";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(nvidia_driver)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=LD_LIBRARY_PATH");
    if std::env::var_os("HOST") != std::env::var_os("TARGET") {
        return;
    }
    if Path::new("/proc/driver/nvidia/version").exists() && library_found() {
        println!("cargo::rustc-cfg=nvidia_driver");
    }
}

/// Whether the dynamic loader would find [`LIBRARY`]: in `LD_LIBRARY_PATH`, in
/// its cache (`ldconfig -p`), or in the default directories.
fn library_found() -> bool {
    let listed = std::env::var_os("LD_LIBRARY_PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let defaults = ["/lib", "/usr/lib", "/lib64", "/usr/lib64"].map(Into::into);
    if listed
        .iter()
        .chain(&defaults)
        .any(|dir: &std::path::PathBuf| dir.join(LIBRARY).exists())
    {
        return true;
    }
    ["ldconfig", "/sbin/ldconfig"].iter().any(|ldconfig| {
        Command::new(ldconfig).arg("-p").output().is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|line| line.trim_start().starts_with(LIBRARY))
        })
    })
}
