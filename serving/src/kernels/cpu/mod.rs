//! The CPU's kernels, for the instructions this CPU has (`detect`), picked once
//! at run time ([`isa`]): products in bf16 on AMX tiles ([`amx`]), f32 products
//! packed for AVX-512 or AVX2+FMA ([`packed`]), the elementwise steps after a projection
//! ([`elementwise`]), and `silu(gate)·up` and attention over the KV pool ([`ops`]),
//! each compiled for AVX-512, AVX2+FMA and the portable baseline
//! (`ops::vectorized!`).

pub mod amx;
mod detect;
pub mod elementwise;
pub mod ops;
pub mod packed;

use std::sync::OnceLock;

/// The widest instructions this CPU (and OS) offers the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain code for the build's baseline.
    Portable,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F.
    Avx512,
    /// AVX-512F and the AMX-BF16 tile units.
    Amx,
}

/// The CPU's instructions, detected the first time and kept.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(detect)
}

fn detect() -> Isa {
    if amx::available() && detect::avx512f() {
        return Isa::Amx;
    }
    if detect::avx512f() {
        return Isa::Avx512;
    }
    if detect::avx2_fma() {
        return Isa::Avx2;
    }
    Isa::Portable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_isa_agrees_with_the_products_available() {
        let found = isa();
        assert_eq!(found >= Isa::Avx512, detect::avx512f());
        assert_eq!(found >= Isa::Avx2, packed::available());
        assert_eq!(found == Isa::Amx, amx::available() && detect::avx512f());
        assert_eq!(found, isa(), "detected once");
    }
}
