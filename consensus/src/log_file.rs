//! The Raft log on disk: one append-only file of checksummed records, one record per
//! [`WriteBatch`], each followed by one `fdatasync` before the write returns.
//!
//! ```text
//! file   := MAGIC record*
//! record := len:u32le crc32:u32le payload[len]          (crc32 of the payload)
//! payload:= snap_kind:u8 [keep_from:u64le] [snap:bytes]  (0 none, 1 install, 2 compact)
//!           has_hs:u8 [hs:bytes]
//!           count:u32le entry:bytes{count}
//! bytes  := len:u32le protobuf[len]
//! ```
//!
//! Loading replays the records through [`LogImage::apply`], the same function that
//! updates memory, so disk and memory cannot disagree on what a batch means. A batch
//! carrying a snapshot rewrites the file instead of appending: the whole resulting
//! image goes to a temporary file as a single record, which is fsynced and renamed over
//! the log (and the directory fsynced), so the entries the snapshot covers leave the
//! disk and a crash leaves either the old file or the new one, both whole.
//!
//! Only the last record can be torn by a crash (a record is appended and synced
//! before the next one starts): a short, zeroed or mis-checksummed record with no
//! whole record after it is cut off on open. A damaged record followed by a whole
//! one is corruption, and the log refuses to open rather than drop what came after
//! it.
//!
//! The file is kept longer than its records by a run of written zeros (up to
//! [`PREALLOCATE_MAX`], ahead of the next records): a record then overwrites blocks
//! the file already has, so its `fdatasync` writes the data alone, with no change of
//! size or extent for the filesystem's journal to commit. Measured on the 2-core
//! development machine (ext4, 700-byte writes): 0.16 ms per write and sync at p50
//! over preallocated blocks against 0.22 ms appending, the one cost every commit
//! waits on. Zeros read as the end of the log, as a torn record's do; on open, a
//! tail of zeros is kept and anything else after the last whole record is cut.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use raft::prelude::{Entry, HardState, Snapshot};

use crate::log_store::{Durable, LogImage, LogStoreError, SnapshotWrite, WriteBatch};

/// The first bytes of a log file: the format and its version.
const MAGIC: &[u8; 8] = b"AIGRLOG1";
const HEADER: usize = 8;
const NO_SNAPSHOT: u8 = 0;
const INSTALL: u8 = 1;
const COMPACT: u8 = 2;
/// The run of zeros kept ahead of the records grows with the log, from this...
const PREALLOCATE_MIN: u64 = 256 << 10;
/// ... to at most this, so a small log (a test's) writes little and a busy one
/// extends its file rarely.
pub const PREALLOCATE_MAX: u64 = 16 << 20;

fn io_err(what: &str, path: &Path, e: std::io::Error) -> LogStoreError {
    LogStoreError::Database(format!("{what} {}: {e}", path.display()))
}

fn corrupt(message: impl Into<String>) -> LogStoreError {
    LogStoreError::Corrupt(message.into())
}

/// The on-disk medium: an append-only file of [`WriteBatch`] records.
pub struct FileLog {
    path: PathBuf,
    file: File,
    /// Bytes of whole records (and the magic) in the file.
    len: u64,
    /// Bytes in the file: `len` and the zeros written after it.
    allocated: u64,
    /// The record being written, reused from batch to batch.
    buf: Vec<u8>,
    /// Set when a write failed part way: the file's tail is unknown until it is
    /// opened again, so nothing more is appended.
    failed: bool,
    /// The image replayed on open, handed to the first `load` so a start reads
    /// and decodes the log once; dropped at the first write.
    opened: Cell<Option<LogImage>>,
}

impl FileLog {
    /// Opens the log at `path`, creating it (and syncing its directory) when absent,
    /// and cuts off a record a crash left torn at its end.
    pub fn open(path: &Path) -> Result<Self, LogStoreError> {
        if !path.exists() {
            // Made whole beside it and renamed, so a crash never leaves a log
            // without its magic.
            replace_with(path, MAGIC)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("opening", path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io_err("reading", path, e))?;
        let (image, whole) = replay(&bytes)?;
        let mut allocated = bytes.len() as u64;
        if bytes[whole..].iter().any(|b| *b != 0) {
            tracing::warn!(
                path = %path.display(),
                kept = whole,
                dropped = bytes.len() - whole,
                "cutting off a log record torn by a crash"
            );
            file.set_len(whole as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err("truncating", path, e))?;
            allocated = whole as u64;
        }
        Ok(FileLog {
            path: path.to_owned(),
            file,
            len: whole as u64,
            allocated,
            buf: Vec::new(),
            failed: false,
            opened: Cell::new(Some(image)),
        })
    }

    fn append(&mut self, batch: &WriteBatch) -> Result<(), LogStoreError> {
        self.buf.clear();
        encode_record(batch, &mut self.buf)?;
        let end = self.len + self.buf.len() as u64;
        let written = self
            .file
            .write_all_at(&self.buf, self.len)
            .and_then(|()| self.preallocate(end))
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Cut what part of the record may have reached the file, so that the
            // next open does not find a torn record in the middle.
            self.failed = true;
            let _ = self.file.set_len(self.len);
            self.allocated = self.len;
            return Err(io_err("appending to", &self.path, e));
        }
        self.len = end;
        Ok(())
    }

    /// Writes zeros after `end` when the records reach past the zeros already
    /// there: as many as the log holds, between [`PREALLOCATE_MIN`] and
    /// [`PREALLOCATE_MAX`]. They go to disk with the record's sync.
    fn preallocate(&mut self, end: u64) -> std::io::Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        let to = end + end.clamp(PREALLOCATE_MIN, PREALLOCATE_MAX);
        let zeros = vec![0u8; (to - end).min(1 << 20) as usize];
        let mut at = end;
        while at < to {
            let n = (to - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.allocated = to;
        Ok(())
    }

    /// Opens the log in `dir` (`raft.log`). A log an earlier version kept in redb
    /// (`raft.redb`) is carried over first, whole, and the old file set aside as
    /// `raft.redb.migrated`.
    pub fn open_in(dir: &Path) -> Result<Self, LogStoreError> {
        let path = dir.join("raft.log");
        let old = dir.join("raft.redb");
        if !path.exists() && old.exists() {
            let image = crate::log_store::RedbDisk::open(&old)?.load()?;
            let mut bytes = MAGIC.to_vec();
            encode_image(&image, &mut bytes)?;
            replace_with(&path, &bytes)?;
            tracing::info!(
                from = %old.display(),
                to = %path.display(),
                entries = image.entries().len(),
                "carried the Raft log over from redb"
            );
            std::fs::rename(&old, dir.join("raft.redb.migrated"))
                .map_err(|e| io_err("setting aside", &old, e))?;
        }
        Self::open(&path)
    }

    /// Replaces the file with one record holding the whole of `image`.
    fn rewrite(&mut self, image: &LogImage) -> Result<(), LogStoreError> {
        self.buf.clear();
        self.buf.extend_from_slice(MAGIC);
        encode_image(image, &mut self.buf)?;
        replace_with(&self.path, &self.buf)?;
        self.file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| io_err("opening", &self.path, e))?;
        self.len = self.buf.len() as u64;
        self.allocated = self.len;
        // A snapshot's buffer can be large; keep only what a batch of entries needs.
        self.buf = Vec::new();
        Ok(())
    }
}

impl Durable for FileLog {
    fn load(&self) -> Result<LogImage, LogStoreError> {
        if let Some(image) = self.opened.take() {
            return Ok(image);
        }
        let bytes = std::fs::read(&self.path).map_err(|e| io_err("reading", &self.path, e))?;
        let (image, _) = replay(&bytes[..(self.len as usize).min(bytes.len())])?;
        Ok(image)
    }

    fn write(&mut self, batch: &WriteBatch, before: &LogImage) -> Result<(), LogStoreError> {
        self.opened.take();
        if self.failed {
            return Err(corrupt(
                "an earlier write failed; the log must be opened again",
            ));
        }
        if batch.snapshot.is_some() {
            let mut after = before.clone();
            after.apply(batch);
            let rewritten = self.rewrite(&after);
            self.failed = rewritten.is_err();
            return rewritten;
        }
        self.append(batch)
    }
}

/// Makes `path` hold exactly `bytes`, durably and atomically: written to a file
/// beside it, synced, renamed over it, and the directory synced.
fn replace_with(path: &Path, bytes: &[u8]) -> Result<(), LogStoreError> {
    let tmp = path.with_extension("rewrite");
    let mut file = File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err("writing", &tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| io_err("renaming", &tmp, e))?;
    sync_dir(path)
}

/// Syncs the directory holding `path`, so a file created or renamed there stays.
fn sync_dir(path: &Path) -> Result<(), LogStoreError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing directory", dir, e))
}

fn put_u32(buf: &mut Vec<u8>, n: usize) -> Result<(), LogStoreError> {
    let n = u32::try_from(n).map_err(|_| corrupt(format!("a log record part of {n} bytes")))?;
    buf.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_message(buf: &mut Vec<u8>, m: &dyn protobuf::Message) -> Result<(), LogStoreError> {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    m.write_to_vec(buf)
        .map_err(|e| corrupt(format!("encoding a log record: {e}")))?;
    let len =
        u32::try_from(buf.len() - at - 4).map_err(|_| corrupt("a log record part over 4 GiB"))?;
    buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Appends `batch` as one record (length, checksum, payload) to `buf`.
fn encode_record(batch: &WriteBatch, buf: &mut Vec<u8>) -> Result<(), LogStoreError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 8]);
    match &batch.snapshot {
        None => buf.push(NO_SNAPSHOT),
        Some(SnapshotWrite::Install(snap)) => {
            buf.push(INSTALL);
            put_message(buf, snap)?;
        }
        Some(SnapshotWrite::Compact {
            snapshot,
            keep_from,
        }) => {
            buf.push(COMPACT);
            buf.extend_from_slice(&keep_from.to_le_bytes());
            put_message(buf, snapshot)?;
        }
    }
    match &batch.hard_state {
        None => buf.push(0),
        Some(hs) => {
            buf.push(1);
            put_message(buf, hs)?;
        }
    }
    put_u32(buf, batch.entries.len())?;
    for entry in &batch.entries {
        put_message(buf, entry)?;
    }
    let payload = &buf[start + 8..];
    let len = u32::try_from(payload.len()).map_err(|_| corrupt("a log record over 4 GiB"))?;
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Appends the record that rebuilds `image` from nothing: its snapshot installed,
/// its entries, its hard state.
fn encode_image(image: &LogImage, buf: &mut Vec<u8>) -> Result<(), LogStoreError> {
    let whole = WriteBatch {
        snapshot: Some(SnapshotWrite::Install(image.snapshot().clone())),
        entries: image.entries().iter().cloned().collect(),
        hard_state: Some(image.hard_state().clone()),
    };
    encode_record(&whole, buf)
}

/// Reads a payload back into the batch it was written from.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LogStoreError> {
        if self.bytes.len() < n {
            return Err(corrupt("a log record ends early"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, LogStoreError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<usize, LogStoreError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn u64(&mut self) -> Result<u64, LogStoreError> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn message<M: protobuf::Message>(&mut self) -> Result<M, LogStoreError> {
        let len = self.u32()?;
        M::parse_from_bytes(self.take(len)?)
            .map_err(|e| corrupt(format!("a log record does not decode: {e}")))
    }
}

fn decode_payload(payload: &[u8]) -> Result<WriteBatch, LogStoreError> {
    let mut r = Reader { bytes: payload };
    let snapshot = match r.u8()? {
        NO_SNAPSHOT => None,
        INSTALL => Some(SnapshotWrite::Install(r.message::<Snapshot>()?)),
        COMPACT => {
            let keep_from = r.u64()?;
            Some(SnapshotWrite::Compact {
                snapshot: r.message::<Snapshot>()?,
                keep_from,
            })
        }
        other => return Err(corrupt(format!("unknown snapshot kind {other}"))),
    };
    let hard_state = match r.u8()? {
        0 => None,
        1 => Some(r.message::<HardState>()?),
        other => return Err(corrupt(format!("unknown hard state flag {other}"))),
    };
    let count = r.u32()?;
    // Each entry takes at least its 4-byte length: a count beyond that is corrupt,
    // and must not reserve memory for it.
    if count > r.bytes.len() / 4 {
        return Err(corrupt(format!("a record claims {count} entries")));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        entries.push(r.message::<Entry>()?);
    }
    if !r.bytes.is_empty() {
        return Err(corrupt("a log record has trailing bytes"));
    }
    Ok(WriteBatch {
        snapshot,
        entries,
        hard_state,
    })
}

/// The payload of the whole, checksummed record at `at`, if there is one.
fn record_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let (len, crc) = header_at(bytes, at)?;
    // No record is empty: a zero length is the zeros a torn write leaves.
    let payload = bytes.get(at + 8..(at + 8).checked_add(len)?)?;
    (len > 0 && crc32fast::hash(payload) == crc).then_some(payload)
}

/// The length and checksum a record header at `at` states, if 8 bytes are there.
fn header_at(bytes: &[u8], at: usize) -> Option<(usize, u32)> {
    let h = bytes.get(at..at.checked_add(8)?)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    Some((len, u32::from_le_bytes([h[4], h[5], h[6], h[7]])))
}

/// Replays a whole file: the image its records build, and the length of the part
/// made of whole records (shorter than `bytes` when the last record is torn).
fn replay(bytes: &[u8]) -> Result<(LogImage, usize), LogStoreError> {
    if bytes.len() < HEADER || &bytes[..HEADER] != MAGIC {
        return Err(corrupt("not an aigrid Raft log (bad magic)"));
    }
    let mut image = LogImage::default();
    let mut at = HEADER;
    while at < bytes.len() {
        let Some(payload) = record_at(bytes, at) else {
            // A record a crash tore ends the file: whatever its header says, no
            // whole record follows it. One that is followed by a whole record is
            // damage in the middle of the log, and dropping what follows would
            // lose acknowledged entries.
            if let Some((len, _)) = header_at(bytes, at) {
                let next = at.saturating_add(8).saturating_add(len);
                if len > 0 && record_at(bytes, next).is_some() {
                    return Err(corrupt(format!(
                        "the log record at byte {at} is damaged and more follow"
                    )));
                }
            }
            break;
        };
        let len = payload.len();
        let batch = decode_payload(payload)
            .map_err(|e| corrupt(format!("the log record at byte {at}: {e}")))?;
        if let (Some(first), Some(last)) = (batch.entries.first(), image.entries().back()) {
            if first.index > last.index + 1 {
                return Err(corrupt(format!(
                    "log gap after index {}: found {}",
                    last.index, first.index
                )));
            }
        }
        image.apply(&batch);
        at += 8 + len;
    }
    Ok((image, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_store::bootstrap_snapshot;

    fn entry(index: u64, term: u64, size: usize) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; size].into(),
            context: format!("c{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn batch(entries: Vec<Entry>) -> WriteBatch {
        WriteBatch {
            entries,
            ..Default::default()
        }
    }

    fn write(log: &mut FileLog, image: &mut LogImage, b: WriteBatch) {
        log.write(&b, image).unwrap();
        image.apply(&b);
    }

    fn same(a: &LogImage, b: &LogImage) {
        assert_eq!(a.hard_state(), b.hard_state());
        assert_eq!(a.snapshot(), b.snapshot());
        assert_eq!(a.entries(), b.entries());
    }

    /// A log with a bootstrap snapshot and entries 2..=6, and its image.
    fn started(path: &Path) -> (FileLog, LogImage) {
        let mut log = FileLog::open(path).unwrap();
        let mut image = log.load().unwrap();
        assert!(image.is_blank());
        let boot = WriteBatch {
            snapshot: Some(SnapshotWrite::Install(bootstrap_snapshot(
                vec![1, 2, 3],
                b"s".to_vec(),
            ))),
            ..Default::default()
        };
        write(&mut log, &mut image, boot);
        write(
            &mut log,
            &mut image,
            batch((2..=6).map(|i| entry(i, 1, 100)).collect()),
        );
        (log, image)
    }

    #[test]
    fn a_snapshot_rewrites_the_file_and_reopens_to_the_same_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let (mut log, mut image) = started(&path);
        let hs = HardState {
            term: 2,
            vote: 3,
            commit: 5,
            ..Default::default()
        };
        write(
            &mut log,
            &mut image,
            WriteBatch {
                entries: vec![entry(5, 2, 10)],
                hard_state: Some(hs),
                ..Default::default()
            },
        );
        write(&mut log, &mut image, batch(vec![entry(6, 2, 10)]));
        let grown = std::fs::metadata(&path).unwrap().len();
        // Compacting behind index 5 but keeping 4.. (entries below the snapshot
        // stay, for lagging followers): the file holds only what is kept.
        let mut snap = image.snapshot().clone();
        snap.mut_metadata().index = 5;
        snap.mut_metadata().term = 2;
        write(
            &mut log,
            &mut image,
            WriteBatch {
                snapshot: Some(SnapshotWrite::Compact {
                    snapshot: snap,
                    keep_from: 4,
                }),
                ..Default::default()
            },
        );
        assert!(std::fs::metadata(&path).unwrap().len() < grown);
        assert!(!path.with_extension("rewrite").exists());
        write(&mut log, &mut image, batch(vec![entry(7, 2, 10)]));
        same(&log.load().unwrap(), &image);
        drop(log);
        let reopened = FileLog::open(&path).unwrap();
        let loaded = reopened.load().unwrap();
        same(&loaded, &image);
        assert_eq!(
            loaded.entries().iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![4, 5, 6, 7]
        );
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let (mut log, mut image) = started(&path);
        let whole = log.len;
        let kept = image.clone();
        write(&mut log, &mut image, batch(vec![entry(7, 1, 300)]));
        let end = log.len as usize;
        drop(log);
        let full = std::fs::read(&path).unwrap()[..end].to_vec();
        // Every cut inside the last record, and a garbled byte in it, reads back
        // as the log before that record.
        for cut in (whole as usize + 1..full.len()).step_by(37) {
            std::fs::write(&path, &full[..cut]).unwrap();
            let log = FileLog::open(&path).unwrap();
            same(&log.load().unwrap(), &kept);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        }
        // Zeros where the record should be (blocks the crash never wrote): they
        // read as the end of the log, and stay as room for the next records.
        let mut zeroed = full[..whole as usize].to_vec();
        zeroed.resize(full.len() + 4096, 0);
        std::fs::write(&path, &zeroed).unwrap();
        let log = FileLog::open(&path).unwrap();
        same(&log.load().unwrap(), &kept);
        assert_eq!(log.len, whole);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), zeroed.len() as u64);
        let mut garbled = full.clone();
        let last = garbled.len() - 5;
        garbled[last] ^= 0xff;
        std::fs::write(&path, &garbled).unwrap();
        let mut log = FileLog::open(&path).unwrap();
        let mut image = log.load().unwrap();
        same(&image, &kept);
        write(&mut log, &mut image, batch(vec![entry(7, 3, 20)]));
        drop(log);
        same(&FileLog::open(&path).unwrap().load().unwrap(), &image);
    }

    /// Records go over the zeros written ahead of them, the file growing by runs
    /// of zeros as the log does; a reopened log goes on after its last record, not
    /// after the zeros.
    #[test]
    fn records_fill_the_zeros_ahead_and_reopen_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let (mut log, mut image) = started(&path);
        let mut sizes = std::collections::BTreeSet::new();
        for i in 7..=300 {
            write(&mut log, &mut image, batch(vec![entry(i, 1, 2000)]));
            let size = std::fs::metadata(&path).unwrap().len();
            assert!(size > log.len, "zeros are kept ahead of the records");
            assert!(size - log.len <= PREALLOCATE_MAX);
            sizes.insert(size);
        }
        assert!(
            sizes.len() > 1 && sizes.len() < 10,
            "grown in runs: {sizes:?}"
        );
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[log.len as usize..].iter().all(|b| *b == 0));
        drop(log);
        let mut log = FileLog::open(&path).unwrap();
        same(&log.load().unwrap(), &image);
        write(&mut log, &mut image, batch(vec![entry(301, 1, 50)]));
        drop(log);
        let log = FileLog::open(&path).unwrap();
        same(&log.load().unwrap(), &image);
        assert_eq!(image.entries().back().unwrap().index, 301);
    }

    #[test]
    fn damage_before_the_last_record_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let (mut log, mut image) = started(&path);
        let first_entries = log.len as usize - 20;
        write(&mut log, &mut image, batch(vec![entry(7, 1, 50)]));
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[first_entries] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            FileLog::open(&path),
            Err(LogStoreError::Corrupt(m)) if m.contains("more follow")
        ));
        std::fs::write(&path, b"not a log").unwrap();
        assert!(matches!(
            FileLog::open(&path),
            Err(LogStoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_redb_log_is_carried_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut redb = crate::log_store::RedbDisk::open(&dir.path().join("raft.redb")).unwrap();
        let mut image = LogImage::default();
        let boot = WriteBatch {
            snapshot: Some(SnapshotWrite::Install(bootstrap_snapshot(
                vec![1, 2, 3],
                b"s".to_vec(),
            ))),
            hard_state: Some(HardState {
                term: 4,
                vote: 2,
                commit: 3,
                ..Default::default()
            }),
            entries: (2..=5).map(|i| entry(i, 4, 30)).collect(),
        };
        redb.write(&boot, &image).unwrap();
        image.apply(&boot);
        drop(redb);
        let mut log = FileLog::open_in(dir.path()).unwrap();
        same(&log.load().unwrap(), &image);
        assert!(!dir.path().join("raft.redb").exists());
        assert!(dir.path().join("raft.redb.migrated").exists());
        write(&mut log, &mut image, batch(vec![entry(6, 4, 30)]));
        drop(log);
        same(
            &FileLog::open_in(dir.path()).unwrap().load().unwrap(),
            &image,
        );
    }

    #[test]
    fn garbage_payloads_are_refused_not_trusted() {
        for payload in [
            &[][..],
            &[9][..],
            &[0, 0, 0xff, 0xff, 0xff, 0xff][..],
            &[0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 1][..],
            &[0, 0, 0, 0, 0, 0, 7][..],
            &[0, 2][..],
        ] {
            assert!(decode_payload(payload).is_err(), "{payload:?}");
        }
    }
}
