//! The CPU's kernels, for the instructions this CPU has (`detect`), picked once
//! at run time ([`isa`], which [`ISA_ENV`] may cap): products in bf16 on AMX tiles ([`amx`]), f32 products
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

/// The environment variable that caps the instructions the kernels use
/// (`avx512`, `avx2` or `portable`): what a CPU without the wider ones would run,
/// on one that has them (to compare, or to reproduce a smaller machine's numbers).
/// It never raises them.
pub const ISA_ENV: &str = "AIGRID_CPU_ISA";

/// The instructions the kernels use: the CPU's (and OS's), capped by
/// [`ISA_ENV`] when set, detected the first time and kept.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var(ISA_ENV).ok();
        match capped(found(), cap.as_deref()) {
            Ok(isa) => isa,
            Err(e) => {
                tracing::warn!("{e}; the CPU's own instructions are used");
                found()
            }
        }
    })
}

/// `found`, capped at `cap` (a name of [`ISA_ENV`]), or an error naming a cap
/// that is none of them.
fn capped(found: Isa, cap: Option<&str>) -> Result<Isa, String> {
    let cap = match cap.map(str::trim) {
        None | Some("") => return Ok(found),
        Some("amx") => Isa::Amx,
        Some("avx512") => Isa::Avx512,
        Some("avx2") => Isa::Avx2,
        Some("portable") => Isa::Portable,
        Some(other) => {
            return Err(format!(
                "{ISA_ENV}={other:?} is not one of amx, avx512, avx2, portable"
            ))
        }
    };
    Ok(found.min(cap))
}

/// The widest instructions this CPU (and OS) has.
fn found() -> Isa {
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
    fn a_cap_lowers_the_instructions_and_never_raises_them() {
        assert_eq!(capped(Isa::Avx512, None), Ok(Isa::Avx512));
        assert_eq!(capped(Isa::Avx512, Some("")), Ok(Isa::Avx512));
        assert_eq!(capped(Isa::Amx, Some("avx2")), Ok(Isa::Avx2));
        assert_eq!(capped(Isa::Avx512, Some(" portable ")), Ok(Isa::Portable));
        assert_eq!(capped(Isa::Avx2, Some("avx512")), Ok(Isa::Avx2));
        assert_eq!(capped(Isa::Portable, Some("amx")), Ok(Isa::Portable));
        let e = capped(Isa::Avx2, Some("sse9")).unwrap_err();
        assert!(e.contains(ISA_ENV) && e.contains("sse9"), "{e}");
        let cap = std::env::var(ISA_ENV).ok();
        let want = capped(found(), cap.as_deref()).unwrap_or_else(|_| found());
        assert_eq!(isa(), want);
    }

    #[test]
    fn the_isa_agrees_with_the_products_available() {
        if std::env::var_os(ISA_ENV).is_some() {
            return;
        }
        let found = isa();
        assert_eq!(found >= Isa::Avx512, detect::avx512f());
        assert_eq!(found >= Isa::Avx2, packed::available());
        assert_eq!(found == Isa::Amx, amx::available() && detect::avx512f());
        assert_eq!(found, isa(), "detected once");
    }
}
