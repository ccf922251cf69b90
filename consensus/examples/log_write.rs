//! Durable log write latency: redb transactions against a plain fsynced file.
//!
//! The Raft log must be on disk before a node acknowledges an append, so the
//! cost that matters is "write a batch of entries and make it durable". This
//! measures that cost for batches of 1 and 64 entries of ~600 bytes with
//!
//! * redb: one write transaction per batch, default durability, entries
//!   inserted as `u64 -> &[u8]` into one table, then `commit`;
//! * file: one `write_all` of the length-prefixed batch appended to a single
//!   file, then `sync_data`.
//!
//! Run with `cargo run --release -p aigrid-consensus --example log_write`.
//! Set `LOG_WRITE_DIR` to measure on a different disk than the default
//! temporary directory, and `LOG_WRITE_BATCHES` to change the batch count.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use redb::ReadableDatabase;

const ENTRY_BYTES: usize = 600;
const BATCH_SIZES: [usize; 2] = [1, 64];
const DEFAULT_BATCHES: usize = 500;
const WARMUP_BATCHES: usize = 10;

const ENTRIES: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("entries");

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

struct RedbLog {
    db: redb::Database,
}

impl RedbLog {
    fn open(path: &Path) -> Result<Self> {
        let db = redb::Database::create(path)?;
        Ok(Self { db })
    }
}

impl LogBackend for RedbLog {
    fn name(&self) -> &'static str {
        "redb (txn per batch)"
    }

    fn append(&mut self, first: u64, batch: &[Vec<u8>]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(ENTRIES)?;
            for (offset, entry) in batch.iter().enumerate() {
                table.insert(first + offset as u64, entry.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn count(&self) -> Result<u64> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        Ok(table.len()?)
    }
}

struct FileLog {
    file: File,
    buf: Vec<u8>,
    written: u64,
}

impl FileLog {
    fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file,
            buf: Vec::new(),
            written: 0,
        })
    }
}

impl LogBackend for FileLog {
    fn name(&self) -> &'static str {
        "file append + sync_data"
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

struct Measurement {
    backend: &'static str,
    batch: usize,
    mean: Duration,
    p50: Duration,
    p99: Duration,
    entries_per_sec: f64,
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
    for round in 0..WARMUP_BATCHES + batches {
        let first = (round * batch) as u64 + 1;
        let entries: Vec<Vec<u8>> = (0..batch as u64)
            .map(|i| entry_payload(first + i))
            .collect();
        for turn in 0..logs.len() {
            let which = (turn + round) % logs.len();
            let started = Instant::now();
            logs[which].append(first, &entries)?;
            let took = started.elapsed();
            if round >= WARMUP_BATCHES {
                samples[which].push(took);
            }
        }
    }

    let total = ((WARMUP_BATCHES + batches) * batch) as u64;
    let mut rows = Vec::with_capacity(logs.len());
    for (log, mut samples) in logs.iter().zip(samples) {
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
            Box::new(RedbLog::open(
                &dir.path().join(format!("log-{batch}.redb")),
            )?),
            Box::new(FileLog::open(&dir.path().join(format!("log-{batch}.bin")))?),
        ];
        rows.extend(measure(&mut logs, batch, batches)?);
    }

    println!("| backend | entries/batch | mean ms/batch | p50 ms | p99 ms | entries/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.0} |",
            r.backend,
            r.batch,
            ms(r.mean),
            ms(r.p50),
            ms(r.p99),
            r.entries_per_sec
        );
    }
    Ok(())
}
