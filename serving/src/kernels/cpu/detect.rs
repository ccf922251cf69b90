//! What this CPU and OS offer the kernels, asked of the CPU (`cpuid`) and of Linux.
//!
//! Written against `std` and `libc` alone: the crate's build script compiles this
//! file too, to mark the tests that need what the building machine lacks as
//! skipped (the `cpu_avx512f` and `cpu_amx_bf16` cfgs).

// Unsafe: the `arch_prctl` system call that asks Linux for permission to use the AMX tile state.
#![allow(unsafe_code)]

/// AVX-512F.
pub fn avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2 with FMA.
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AMX-TILE and AMX-BF16 with the tiles the AMX product configures, and Linux's
/// permission for this process to use the tile state (asked for here: Linux gives
/// a process the 8 KiB of tile data only when asked).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub fn amx_bf16() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let max_leaf = __cpuid_count(0, 0).eax;
    if max_leaf < 0x1d {
        return false;
    }
    let features = __cpuid_count(7, 0);
    let (bf16, tile) = (features.edx & (1 << 22) != 0, features.edx & (1 << 24) != 0);
    if !(bf16 && tile) {
        return false;
    }
    // Palette 1 must have the tiles the product configures: 8 tiles of 16 rows of
    // 64 bytes.
    let palette = __cpuid_count(0x1d, 1);
    let (bytes_per_row, names, rows) = (
        palette.ebx & 0xffff,
        palette.ebx >> 16,
        palette.ecx & 0xffff,
    );
    if bytes_per_row < 64 || names < 8 || rows < 16 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's
    // permission to use the tile state.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

/// AMX-TILE and AMX-BF16: none off x86-64 Linux.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub fn amx_bf16() -> bool {
    false
}
