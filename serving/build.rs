//! Marks the tests that need a CPU feature this machine lacks as skipped.
//!
//! `cpu_avx2_fma` is set where the CPU has AVX2 and FMA, `cpu_avx512f` where it has
//! AVX-512F, and `cpu_amx_bf16` where it
//! also has AMX-BF16 and Linux grants the tile state (the AMX product needs both).
//! A test that needs one carries `#[cfg_attr(not(cpu_…), ignore = "skipped: …")]`,
//! so `cargo test` lists it as `ignored, skipped: …` where it cannot run, and runs
//! it (where it can fail) everywhere else. The detection is the kernels' own
//! ([`detect`]), run on the machine that builds: so only when it is also the one the
//! tests run on (no cross-compiling).

#[allow(dead_code)]
#[path = "src/kernels/cpu/detect.rs"]
mod detect;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(cpu_avx512f)");
    println!("cargo::rustc-check-cfg=cfg(cpu_amx_bf16)");
    println!("cargo::rustc-check-cfg=cfg(cpu_avx2_fma)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels/cpu/detect.rs");
    if std::env::var_os("HOST") != std::env::var_os("TARGET") {
        return;
    }
    if detect::avx2_fma() {
        println!("cargo::rustc-cfg=cpu_avx2_fma");
    }
    let avx512f = detect::avx512f();
    if avx512f {
        println!("cargo::rustc-cfg=cpu_avx512f");
    }
    if avx512f && detect::amx_bf16() {
        println!("cargo::rustc-cfg=cpu_amx_bf16");
    }
}
