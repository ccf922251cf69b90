//! The Raft log on disk: one append-only file of checksummed records, one record per
//! [`WriteBatch`], each durable before the write returns: written with one direct,
//! synchronous write where the file system allows it ([`direct`]), else written and
//! `fdatasync`ed.
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
//! disk and a crash leaves either the old file or the new one, both whole. A local
//! snapshot's rewrite runs in the background while appends go on ([`rewrite`]).
//!
//! Only the last record can be torn by a crash (a record is appended and synced
//! before the next one starts): a short, zeroed or mis-checksummed record with no
//! whole record after it is cut off on open. A damaged record followed by a whole
//! one is corruption, and the log refuses to open rather than drop what came after
//! it.
//!
//! The file is kept longer than its records by a run of written zeros (up to
//! [`PREALLOCATE_MAX`], ahead of the next records): a record then overwrites blocks
//! the file already has, so its write (direct) or its `fdatasync` writes the data
//! alone, with no change of size or extent for the filesystem's journal to commit.
//! Measured on the 2-core development machine (ext4, 700-byte writes, written and
//! synced through the page cache): 0.16 ms per write and sync at p50
//! over preallocated blocks against 0.22 ms appending, the one cost every commit
//! waits on. Zeros read as the end of the log, as a torn record's do; on open, a
//! tail of zeros is kept and anything else after the last whole record is cut.
//! The zeros are written by a background thread, ahead of need ([`zeros`]).

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
/// A run is started when less than half of one is left ahead of the records.
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
    /// The next run of zeros, being written after `allocated` (see [`zeros`]).
    zeroing: Option<zeros::Zeroing>,
    /// After a run of zeros failed, none is started before the records reach here.
    zeros_held_until: u64,
    /// The record being written, reused from batch to batch.
    buf: Vec<u8>,
    /// Set when a write failed part way: the file's tail is unknown until it is
    /// opened again, so nothing more is appended.
    failed: bool,
    /// The image replayed on open, handed to the first `load` so a start reads
    /// and decodes the log once; dropped at the first write.
    opened: Cell<Option<LogImage>>,
    /// A compaction's new file being written in the background (see [`rewrite`]).
    rewrite: Option<rewrite::Rewrite>,
    /// The file opened for direct writes; `None` where the file system refuses
    /// them, and records are written and synced through the page cache.
    direct: Option<direct::DirectAppender>,
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
        // A compaction a crash cut short left its new file unfinished: the log is
        // the live file, whole, and the next snapshot compacts it again.
        let _ = std::fs::remove_file(unfinished(path));
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
        let direct = open_direct(path, Ok(direct::tail_of(&bytes[..whole])));
        Ok(FileLog {
            path: path.to_owned(),
            file,
            len: whole as u64,
            allocated,
            zeroing: None,
            zeros_held_until: 0,
            buf: Vec::new(),
            failed: false,
            opened: Cell::new(Some(image)),
            rewrite: None,
            direct,
        })
    }

    fn append(&mut self, batch: &WriteBatch) -> Result<(), LogStoreError> {
        self.buf.clear();
        encode_record(batch, &mut self.buf)?;
        let end = self.len + self.buf.len() as u64;
        // A direct write reaches the end of the record's last block: the zeros
        // must be written there first, never after.
        let reaches = match self.direct {
            Some(_) => direct::block_end(end),
            None => end,
        };
        self.collect_zeros(reaches);
        if let Err(e) = self.write_record() {
            // Cut what part of the record may have reached the file, so that the
            // next open does not find a torn record in the middle.
            self.failed = true;
            self.stop_zeros();
            let _ = self.file.set_len(self.len);
            self.allocated = self.len;
            return Err(io_err("appending to", &self.path, e));
        }
        self.len = end;
        self.allocated = self.allocated.max(reaches);
        if let Some(rewrite) = &mut self.rewrite {
            rewrite.keep(&self.buf);
        }
        self.zero_ahead();
        Ok(())
    }

    /// Writes the record in `buf` at the end of the records, durably: directly
    /// where the file system allows it, else through the page cache and synced.
    fn write_record(&mut self) -> std::io::Result<()> {
        if let Some(appender) = &mut self.direct {
            match appender.append(self.len, &self.buf)? {
                direct::Appended::Done => return Ok(()),
                direct::Appended::Refused(error) => {
                    tracing::warn!(%error, path = %self.path.display(), "the file system refused a direct write; the log writes through the page cache from now on");
                    self.direct = None;
                }
            }
        }
        self.file
            .write_all_at(&self.buf, self.len)
            .and_then(|()| self.file.sync_data())
    }

    /// Takes the zeros written so far by the run under way as room for records,
    /// waiting for them to reach `end` (a record ending there) when they do not
    /// yet, and takes the run in once it is done.
    fn collect_zeros(&mut self, end: u64) {
        let Some(zeroing) = &self.zeroing else {
            return;
        };
        let (reached, done) = zeroing.wait_for(end);
        self.allocated = self.allocated.max(reached);
        if let Some(mut zeroing) = self.zeroing.take_if(|_| done) {
            if let Err(e) = zeroing.join() {
                self.hold_zeros(&e);
            }
        }
    }

    /// Starts writing the next run of zeros when less than half a run is left
    /// after the records: as many as the log holds, between [`PREALLOCATE_MIN`]
    /// and [`PREALLOCATE_MAX`].
    fn zero_ahead(&mut self) {
        let run = self.zeros_run();
        if self.zeroing.is_some()
            || self.len < self.zeros_held_until
            || self.allocated >= self.len + run / 2
        {
            return;
        }
        match zeros::Zeroing::start(&self.path, &self.file, self.allocated, self.len + run) {
            Ok(zeroing) => self.zeroing = Some(zeroing),
            Err(e) => self.hold_zeros(&e),
        }
    }

    /// After a run of zeros failed: appends grow the file for a run's length
    /// before another is tried.
    fn hold_zeros(&mut self, error: &std::io::Error) {
        tracing::warn!(%error, path = %self.path.display(), "cannot write zeros ahead of the log's records");
        self.zeros_held_until = self.len + self.zeros_run();
    }

    /// The length of a run of zeros: as many as the log holds, within bounds.
    fn zeros_run(&self) -> u64 {
        self.len.clamp(PREALLOCATE_MIN, PREALLOCATE_MAX)
    }

    /// Stops a run of zeros under way (its file is about to be replaced or cut).
    fn stop_zeros(&mut self) {
        // Dropping a run stops its thread and waits for it.
        drop(self.zeroing.take());
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

    /// Replaces the file with one record holding the whole of `image`, dropping a
    /// rewrite under way.
    fn rewrite(&mut self, image: &LogImage) -> Result<(), LogStoreError> {
        if let Some(rewrite) = self.rewrite.take() {
            rewrite.abandon();
        }
        self.stop_zeros();
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
        self.direct = open_direct(&self.path, Ok(direct::tail_of(&self.buf)));
        // A snapshot's buffer can be large; keep only what a batch of entries needs.
        self.buf = Vec::new();
        Ok(())
    }

    /// Compacts as `after` says, in the background: the live file keeps the log
    /// until the new one is whole (see [`rewrite`]).
    fn compact(&mut self, after: LogImage) -> Result<(), LogStoreError> {
        self.settle(true)?;
        match rewrite::Rewrite::start(&self.path, after) {
            Ok(started) => self.rewrite = Some(started),
            // The live file stays the log, whole; the next snapshot compacts it.
            Err(e) => tracing::warn!(error = %e, "cannot start the log's rewrite"),
        }
        Ok(())
    }

    /// Makes a rewrite's new file the log once it is written (`wait`: waits for
    /// it). One that failed leaves the live file as the log, whole.
    fn settle(&mut self, wait: bool) -> Result<(), LogStoreError> {
        let Some(rewrite) = self.rewrite.take_if(|r| wait || r.is_written()) else {
            return Ok(());
        };
        let (file, len, unsynced) = match rewrite.finish(&self.path) {
            rewrite::Finished::Swapped { file, len } => (file, len, None),
            rewrite::Finished::Dropped(reason) => {
                tracing::warn!(%reason, path = %self.path.display(), "the log's rewrite was dropped; the next snapshot compacts it");
                return Ok(());
            }
            rewrite::Finished::Unsynced { file, len, error } => (file, len, Some(error)),
        };
        self.stop_zeros();
        self.file = file;
        self.len = len;
        self.allocated = len;
        self.direct = open_direct(&self.path, direct::read_tail(&self.path, len));
        if let Some(error) = unsynced {
            self.failed = true;
            return Err(error);
        }
        tracing::debug!(path = %self.path.display(), bytes = len, "the log file was compacted");
        Ok(())
    }
}

impl Drop for FileLog {
    /// Lets a rewrite under way finish and swaps it in, so a log closed right after
    /// a snapshot opens compacted, and stops a run of zeros under way: no thread
    /// goes on writing beside it.
    fn drop(&mut self) {
        if self.failed {
            if let Some(rewrite) = self.rewrite.take() {
                rewrite.abandon();
            }
        } else if let Err(e) = self.settle(true) {
            tracing::warn!(error = %e, "compacting the log as it closed");
        }
        self.stop_zeros();
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
        if let Some(snapshot) = &batch.snapshot {
            // Only the entries the batch leaves are copied: before the first
            // snapshot the log holds every entry since the cluster began.
            // A local snapshot with nothing else to persist is compacted in the
            // background: nothing waits on it being durable. An installed
            // snapshot is the log from now on, so it is written before this returns.
            let (keep_from, local) = match snapshot {
                SnapshotWrite::Compact { keep_from, .. } => (
                    *keep_from,
                    batch.entries.is_empty() && batch.hard_state.is_none(),
                ),
                SnapshotWrite::Install(_) => (u64::MAX, false),
            };
            let mut after = before.kept_from(keep_from);
            after.apply(batch);
            let written = if local {
                self.compact(after)
            } else {
                self.rewrite(&after)
            };
            self.failed = written.is_err();
            return written;
        }
        self.append(batch)?;
        self.settle(false)
    }
}

/// The log at `path` opened for direct writes, `tail` being the bytes of its
/// last partly filled block; `None` where they cannot be had, and the log writes
/// through the page cache.
fn open_direct(path: &Path, tail: std::io::Result<Vec<u8>>) -> Option<direct::DirectAppender> {
    let opened = tail.and_then(|tail| direct::DirectAppender::open(path, tail));
    match opened {
        Ok(appender) => appender,
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "cannot open the log for direct writes; it writes through the page cache");
            None
        }
    }
}

/// Makes `path` hold exactly `bytes`, durably and atomically: written to a file
/// beside it, synced, renamed over it, and the directory synced.
fn replace_with(path: &Path, bytes: &[u8]) -> Result<(), LogStoreError> {
    let tmp = unfinished(path);
    drop(write_synced(&tmp, bytes)?);
    std::fs::rename(&tmp, path).map_err(|e| io_err("renaming", &tmp, e))?;
    sync_dir(path)
}

/// Where the file that will replace the log at `path` is written first.
fn unfinished(path: &Path) -> PathBuf {
    path.with_extension("rewrite")
}

/// Creates `at` holding exactly `bytes`, synced; returns it open for writing.
fn write_synced(at: &Path, bytes: &[u8]) -> Result<File, LogStoreError> {
    let mut file = File::create(at).map_err(|e| io_err("creating", at, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err("writing", at, e))?;
    Ok(file)
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

#[path = "log_file_direct.rs"]
mod direct;

#[path = "log_file_rewrite.rs"]
mod rewrite;

#[path = "log_file_zeros.rs"]
mod zeros;

#[cfg(test)]
#[path = "log_file_tests.rs"]
mod tests;
