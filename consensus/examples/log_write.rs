//! Durable log write cost: aigrid's Raft log file against redb, a bare fsynced file
//! and a bare direct, synchronous write (the floor on this disk).
//!
//! The Raft log must be on disk before a node acknowledges an append, so the
//! cost that matters is "write a batch of entries and make it durable", in wall
//! time and in CPU (on a busy server the CPU is what the rest of the work
//! competes for). This measures both for batches of 1 and 64 entries of ~600
//! bytes with
//!
//! * `FileLog`: the log the servers run (`aigrid_consensus::log_file`), through
//!   the same `Durable::write` the replica calls: one checksummed record per
//!   batch, written over the zeros the log keeps ahead of its records with one
//!   direct, synchronous write of its blocks (or written, then `sync_data`, where
//!   the file system refuses direct I/O);
//! * `RedbDisk`: the redb-backed medium the servers used before, through the same
//!   call: one write transaction per batch, default durability;
//! * file: one `write_all` of the length-prefixed batch appended to a single
//!   file, then `sync_data`: the floor a log written through the page cache pays;
//! * direct: the batch written from a block boundary, padded to whole blocks,
//!   with one `O_DIRECT | O_DSYNC` write: the floor on this disk.
//!
//! CPU is the writing thread's own (`CLOCK_THREAD_CPUTIME_ID`): user time plus
//! the kernel time spent in its `write` and `fsync` calls. The max column is the
//! slowest batch: where a write that also extends the file's preallocated zeros
//! shows.
//!
//! Run with `cargo run --release -p aigrid-consensus --example log_write`.
//! Set `LOG_WRITE_DIR` to measure on a different disk than the default
//! temporary directory, and `LOG_WRITE_BATCHES` to change the batch count.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use aigrid_consensus::log_file::FileLog;
use aigrid_consensus::log_store::{
    bootstrap_snapshot, Durable, LogImage, RedbDisk, SnapshotWrite, WriteBatch,
};
use nix::time::{clock_gettime, ClockId};
use raft::prelude::Entry;

const ENTRY_BYTES: usize = 600;
const BATCH_SIZES: [usize; 2] = [1, 64];
const DEFAULT_BATCHES: usize = 500;
const WARMUP_BATCHES: usize = 10;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// A deterministic, poorly compressible payload so every entry differs.
fn entry_payload(index: u64) -> Vec<u8> {
    let mut state = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..ENTRY_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

trait LogBackend {
    fn name(&self) -> &'static str;
    /// Appends entries `first..first + batch.len()` and makes them durable.
    fn append(&mut self, first: u64, batch: &[Vec<u8>]) -> Result<()>;
    /// Number of entries that can be read back.
    fn count(&self) -> Result<u64>;
}

/// One of the servers' `Durable` media, fed what a replica feeds it.
struct Medium {
    name: &'static str,
    disk: Box<dyn Durable>,
    image: LogImage,
}

impl Medium {
    fn open(name: &'static str, mut disk: Box<dyn Durable>) -> Result<Self> {
        let mut image = disk.load()?;
        let boot = WriteBatch {
            snapshot: Some(SnapshotWrite::Install(bootstrap_snapshot(
                vec![1],
                Vec::new(),
            ))),
            ..Default::default()
        };
        disk.write(&boot, &image)?;
        image.apply(&boot);
        Ok(Self { name, disk, image })
    }
}

impl LogBackend for Medium {
    fn name(&self) -> &'static str {
        self.name
    }

    fn append(&mut self, first: u64, batch: &[Vec<u8>]) -> Result<()> {
        // Bootstrapped at index 1: entry n of the benchmark is log index n + 1.
        let entries = batch
            .iter()
            .enumerate()
            .map(|(offset, data)| Entry {
                index: first + offset as u64 + 1,
                term: 1,
                data: data.clone().into(),
                ..Default::default()
            })
            .collect();
        let batch = WriteBatch {
            entries,
            ..Default::default()
        };
        self.disk.write(&batch, &self.image)?;
        self.image.apply(&batch);
        Ok(())
    }

    fn count(&self) -> Result<u64> {
        Ok(self.disk.load()?.entries().len() as u64)
    }
}

struct PlainFile {
    file: File,
    buf: Vec<u8>,
    written: u64,
}

impl PlainFile {
    fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file,
            buf: Vec::new(),
            written: 0,
        })
    }
}

impl LogBackend for PlainFile {
    fn name(&self) -> &'static str {
        "bare file append + sync_data"
    }

    fn append(&mut self, first: u64, batch: &[Vec<u8>]) -> Result<()> {
        self.buf.clear();
        for (offset, entry) in batch.iter().enumerate() {
            self.buf
                .extend_from_slice(&(first + offset as u64).to_le_bytes());
            self.buf
                .extend_from_slice(&(entry.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(entry);
        }
        self.file.write_all(&self.buf)?;
        self.file.sync_data()?;
        self.written += batch.len() as u64;
        Ok(())
    }

    fn count(&self) -> Result<u64> {
        let len = self.file.metadata()?.len();
        let expected = self.written * (8 + 4 + ENTRY_BYTES as u64);
        if len != expected {
            return Err(format!("file holds {len} bytes, expected {expected}").into());
        }
        Ok(self.written)
    }
}

/// The floor of a durable append on this disk: each batch written straight from
/// memory with one direct, synchronous write, from a block boundary and padded to
/// whole blocks (no earlier bytes written again, no checksum, no framing), over
/// zeros written and synced when the file is made, as the log keeps ahead.
struct DirectFile {
    file: File,
    buf: Vec<u8>,
    at: u64,
    written: u64,
}

const BLOCK: usize = 4096;

impl DirectFile {
    fn open(path: &Path, room: usize) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut zeros = File::create(path)?;
        zeros.write_all(&vec![0; room.div_ceil(BLOCK) * BLOCK])?;
        zeros.sync_all()?;
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)?;
        Ok(Self {
            file,
            buf: Vec::new(),
            at: 0,
            written: 0,
        })
    }
}

impl LogBackend for DirectFile {
    fn name(&self) -> &'static str {
        "bare direct write (O_DIRECT|O_DSYNC)"
    }

    fn append(&mut self, first: u64, batch: &[Vec<u8>]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let len: usize = batch.iter().map(|e| 12 + e.len()).sum();
        let padded = len.div_ceil(BLOCK) * BLOCK;
        self.buf.clear();
        self.buf.resize(padded + BLOCK, 0);
        let skip = (BLOCK - self.buf.as_ptr().addr() % BLOCK) % BLOCK;
        let mut at = skip;
        for (offset, entry) in batch.iter().enumerate() {
            self.buf[at..at + 8].copy_from_slice(&(first + offset as u64).to_le_bytes());
            self.buf[at + 8..at + 12].copy_from_slice(&(entry.len() as u32).to_le_bytes());
            self.buf[at + 12..at + 12 + entry.len()].copy_from_slice(entry);
            at += 12 + entry.len();
        }
        self.file
            .write_all_at(&self.buf[skip..skip + padded], self.at)?;
        self.at += padded as u64;
        self.written += batch.len() as u64;
        Ok(())
    }

    fn count(&self) -> Result<u64> {
        let len = self.file.metadata()?.len();
        if len < self.at {
            return Err(format!("file holds {len} bytes, expected {}", self.at).into());
        }
        Ok(self.written)
    }
}

struct Measurement {
    backend: &'static str,
    batch: usize,
    mean: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    cpu: Duration,
    entries_per_sec: f64,
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Writes `batches` batches of `batch` entries to every backend. Backends take
/// turns batch by batch (alternating who goes first), so background disk or
/// CPU activity hits all of them alike instead of skewing one row.
fn measure(
    logs: &mut [Box<dyn LogBackend>],
    batch: usize,
    batches: usize,
) -> Result<Vec<Measurement>> {
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(batches); logs.len()];
    let mut cpu = vec![Duration::ZERO; logs.len()];
    for round in 0..WARMUP_BATCHES + batches {
        let first = (round * batch) as u64 + 1;
        let entries: Vec<Vec<u8>> = (0..batch as u64)
            .map(|i| entry_payload(first + i))
            .collect();
        for turn in 0..logs.len() {
            let which = (turn + round) % logs.len();
            let (started, cpu_before) = (Instant::now(), thread_cpu());
            logs[which].append(first, &entries)?;
            let took = started.elapsed();
            if round >= WARMUP_BATCHES {
                samples[which].push(took);
                cpu[which] += thread_cpu().saturating_sub(cpu_before);
            }
        }
    }

    let total = ((WARMUP_BATCHES + batches) * batch) as u64;
    let mut rows = Vec::with_capacity(logs.len());
    for ((log, mut samples), cpu) in logs.iter().zip(samples).zip(cpu) {
        let stored = log.count()?;
        if stored != total {
            return Err(format!("{} holds {stored} entries, expected {total}", log.name()).into());
        }
        let sum: Duration = samples.iter().sum();
        samples.sort_unstable();
        let pick = |p: f64| {
            let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        rows.push(Measurement {
            backend: log.name(),
            batch,
            mean: sum / batches as u32,
            p50: pick(50.0),
            p99: pick(99.0),
            max: pick(100.0),
            cpu: cpu / batches as u32,
            entries_per_sec: (batches * batch) as f64 / sum.as_secs_f64(),
        });
    }
    Ok(rows)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let batches = match std::env::var("LOG_WRITE_BATCHES") {
        Ok(v) => v.parse::<usize>()?.max(1),
        Err(_) => DEFAULT_BATCHES,
    };
    let dir = match std::env::var_os("LOG_WRITE_DIR") {
        Some(parent) => tempfile::tempdir_in(parent)?,
        None => tempfile::tempdir()?,
    };
    println!(
        "durable log writes: {batches} batches per row, {ENTRY_BYTES}-byte entries, in {}",
        dir.path().display()
    );
    println!();

    let mut rows = Vec::new();
    for &batch in &BATCH_SIZES {
        let mut logs: Vec<Box<dyn LogBackend>> = vec![
            Box::new(Medium::open(
                "FileLog (aigrid)",
                Box::new(FileLog::open(&dir.path().join(format!("log-{batch}.log")))?),
            )?),
            Box::new(Medium::open(
                "RedbDisk (redb)",
                Box::new(RedbDisk::open(
                    &dir.path().join(format!("log-{batch}.redb")),
                )?),
            )?),
            Box::new(PlainFile::open(
                &dir.path().join(format!("log-{batch}.bin")),
            )?),
            Box::new(DirectFile::open(
                &dir.path().join(format!("log-{batch}.direct")),
                (batches + WARMUP_BATCHES) * (batch * (12 + ENTRY_BYTES)).div_ceil(BLOCK) * BLOCK,
            )?),
        ];
        rows.extend(measure(&mut logs, batch, batches)?);
    }

    println!(
        "| backend | entries/batch | mean ms/batch | p50 ms | p99 ms | max ms | CPU µs/batch | entries/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} |",
            r.backend,
            r.batch,
            ms(r.mean),
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.cpu.as_secs_f64() * 1e6,
            r.entries_per_sec
        );
    }
    Ok(())
}
