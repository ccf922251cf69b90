//! Measuring a run: wall time and the CPU the process used, the median and the
//! spread of repetitions; and clearing a run's directories before the next.

// Unsafe: `getrusage(2)` into a zeroed `rusage`, the process's CPU time.
#![allow(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// User plus system CPU seconds this process has used.
pub(crate) fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value, and getrusage only writes into the
    // struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF is valid and `usage` is a live, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// One timed run: wall time and the CPU the process used meanwhile.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) wall: Duration,
    pub(crate) cpu: f64,
    /// When the run ended.
    pub(crate) end: Instant,
}

/// Wall time and CPU of `f`.
pub(crate) async fn timed<T>(
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<(Timing, T)> {
    let cpu = cpu_seconds();
    let start = Instant::now();
    let out = f.await?;
    let end = Instant::now();
    Ok((
        Timing {
            wall: end - start,
            cpu: cpu_seconds() - cpu,
            end,
        },
        out,
    ))
}

/// The index of the median sample by wall time (the lower one of an even count).
pub(crate) fn median_index(samples: &[Timing]) -> usize {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|i| samples[*i].wall);
    order[(order.len() - 1) / 2]
}

pub(crate) fn wall_range(samples: &[Timing]) -> (f64, f64) {
    let walls = samples.iter().map(|t| t.wall.as_secs_f64());
    (
        walls.clone().fold(f64::INFINITY, f64::min),
        walls.fold(0.0, f64::max),
    )
}

pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}
