//! What a run prints: the table of medians and spreads, the targets, the machine,
//! and how much of it other processes took meanwhile.

use crate::workload::{Imp, Op};

/// The columns and rows a table shows, as asked for on the command line.
pub(crate) struct Columns {
    pub(crate) imps: Vec<Imp>,
    pub(crate) threads: Vec<usize>,
    pub(crate) block_kib: usize,
}

/// Clock ticks the whole machine spent busy and in all, and this process's own CPU
/// time, from `/proc`: the difference over a run says how much of the machine other
/// processes took meanwhile, which on a shared machine decides whether a run counts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    pub(crate) busy: u64,
    pub(crate) total: u64,
    pub(crate) own: u64,
}

impl CpuSample {
    pub(crate) fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // user nice system idle iowait irq softirq steal
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let total: u64 = ticks.iter().sum();
        let idle = ticks.get(3)? + ticks.get(4)?;
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // After the command name: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = own_stat.rsplit_once(')')?.1.split_whitespace().collect();
        let own = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(CpuSample {
            busy: total - idle,
            total,
            own,
        })
    }

    /// The share of all cores that other processes used since `self`.
    pub(crate) fn others_since(self, now: CpuSample) -> Option<f64> {
        let total = now.total.checked_sub(self.total).filter(|&t| t > 0)?;
        let busy = now.busy.saturating_sub(self.busy);
        let own = now.own.saturating_sub(self.own);
        Some(busy.saturating_sub(own) as f64 / total as f64)
    }
}

/// One measured cell.
pub(crate) struct Cell {
    pub(crate) op: Op,
    pub(crate) threads: usize,
    pub(crate) imp: Imp,
    /// GB/s of data bytes, one per timed repetition.
    pub(crate) samples: Vec<f64>,
}

/// The cells of one (code, shard size).
pub(crate) struct Group {
    pub(crate) k: usize,
    pub(crate) m: usize,
    pub(crate) shard: usize,
    pub(crate) stripes: usize,
    pub(crate) cells: Vec<Cell>,
    /// Share of the machine other processes used during the timed repetitions.
    pub(crate) others: Option<f64>,
}

impl Group {
    pub(crate) fn cell(&self, op: Op, threads: usize, imp: Imp) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.op == op && c.threads == threads && c.imp == imp)
    }
}

pub(crate) fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub(crate) fn range(samples: &[f64]) -> (f64, f64) {
    let lo = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

pub(crate) fn imp_name(imp: Imp, block_kib: usize) -> String {
    match imp {
        Imp::Memcpy => "memcpy".into(),
        Imp::Codec => "Codec (rse)".into(),
        Imp::CodecParity => "Codec::encode_parity".into(),
        Imp::RseRaw => "rse raw".into(),
        Imp::RseBlocked => format!("rse raw, {block_kib} KiB blocks"),
        Imp::Simd => "rs-simd".into(),
    }
}

pub(crate) fn print_table(
    columns: &Columns,
    groups: &[Group],
    cell_text: impl Fn(&Cell) -> String,
) {
    let names: Vec<String> = columns
        .imps
        .iter()
        .map(|&i| imp_name(i, columns.block_kib))
        .collect();
    println!(
        "| code | shard | operation | threads | {} |",
        names.join(" | ")
    );
    println!("|:--|--:|:--|--:|{}", "--:|".repeat(columns.imps.len()));
    for g in groups {
        for op in [Op::Encode, Op::Reconstruct] {
            for &threads in &columns.threads {
                let cells: Vec<String> = columns
                    .imps
                    .iter()
                    .map(|&imp| g.cell(op, threads, imp).map_or("-".into(), &cell_text))
                    .collect();
                let op_name = match op {
                    Op::Encode => "encode".to_string(),
                    Op::Reconstruct => format!("reconstruct, {} data lost", g.m),
                };
                println!(
                    "| {}+{} | {} KiB | {op_name} | {threads} | {} |",
                    g.k,
                    g.m,
                    g.shard >> 10,
                    cells.join(" | ")
                );
            }
        }
    }
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub(crate) fn simd_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = Vec::new();
        if is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if is_x86_feature_detected!("avx512bw") {
            f.push("avx512bw");
        }
        if is_x86_feature_detected!("gfni") {
            f.push("gfni");
        }
        f.join(", ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// The target: the production paths (`Codec::encode_parity` for a push, `code_stripe` for
/// a repair, `rebuild` for a read) at 80% or more of reed-solomon-erasure called raw on
/// column blocks, row by row. A Codec call codes on every core, so the like-for-like
/// rows are those whose callers use the whole machine (the most threads).
pub(crate) fn print_targets(columns: &Columns, groups: &[Group]) {
    const SHARE: f64 = 0.8;
    if !columns.imps.contains(&Imp::RseBlocked) {
        return;
    }
    let Some(&most) = columns.threads.iter().max() else {
        return;
    };
    println!(
        "Target: each production path >= {:.0}% of rse raw in {} KiB blocks in the same row (medians; the rows with {most} threads use the whole machine on both sides).",
        SHARE * 100.0,
        columns.block_kib
    );
    println!();
    println!("| code | threads | push: encode_parity | repair: code_stripe | read: rebuild |");
    println!("|:--|--:|:--|:--|:--|");
    let ratio = |ours: Option<&Cell>, raw: Option<&Cell>| match (ours, raw) {
        (Some(o), Some(r)) => {
            let share = median(&o.samples) / median(&r.samples);
            let word = if share >= SHARE { "met" } else { "MISSED" };
            format!("{:.0}% {word}", share * 100.0)
        }
        _ => "-".into(),
    };
    for g in groups {
        for &threads in &columns.threads {
            let raw = |op| g.cell(op, threads, Imp::RseBlocked);
            println!(
                "| {}+{} @ {} KiB | {threads} | {} | {} | {} |",
                g.k,
                g.m,
                g.shard >> 10,
                ratio(
                    g.cell(Op::Encode, threads, Imp::CodecParity),
                    raw(Op::Encode)
                ),
                ratio(g.cell(Op::Encode, threads, Imp::Codec), raw(Op::Encode)),
                ratio(
                    g.cell(Op::Reconstruct, threads, Imp::Codec),
                    raw(Op::Reconstruct)
                ),
            );
        }
    }
}
