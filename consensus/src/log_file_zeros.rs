//! Writing the log file's zeros ahead of its records off the replica's thread.
//!
//! The zeros (see [`super`]) used to be written by the append that ran out
//! of them, and flushed by that append's `fdatasync`: every commit behind it waited
//! for the whole run to reach the disk. On the 2-core development machine (ext4)
//! that stalled the commit path 1.3 ms for 1 MiB of zeros, 3.4 ms for 4 MiB and
//! 13 ms for 16 MiB, once per run, on every replica.
//!
//! Now an append that finds the zeros ahead running low starts a thread that
//! writes the next run behind them, and returns. The thread writes through its
//! own open file (its own write-error state, so an error it meets on the shared
//! pages is also reported to the replica's next sync), a chunk at a time, and
//! waits for each chunk to reach the disk before writing the next: the replica's
//! `fdatasync`, which flushes every dirty page of the file, finds at most one
//! chunk of zeros to flush with its record. The thread publishes how far its
//! zeros reach and never writes before that again: an append that would reach
//! past it waits for the zeros to get there (one chunk, normally), so a record is
//! never overwritten by zeros. A direct write ([`super::direct`]) covers the
//! record's last block whole, so it waits for the zeros to reach that block's end:
//! no page of zeros is left to be written back over it.

// Unsafe: one `sync_file_range(2)` call per chunk, which std and nix do not offer.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

/// The zeros written and flushed at a time: the most the replica's sync can find
/// of them in the page cache, and the most an append waits for when it reaches
/// the run being written.
const CHUNK: usize = 64 << 10;

/// A run of zeros being written by a background thread.
pub(super) struct Zeroing {
    thread: Option<JoinHandle<std::io::Result<()>>>,
    shared: Arc<Shared>,
}

/// What the thread and the log share.
struct Shared {
    progress: Mutex<Progress>,
    moved: Condvar,
    stop: AtomicBool,
}

struct Progress {
    /// Zeros are written up to here: the thread never writes before it again,
    /// so records may.
    reached: u64,
    done: bool,
}

impl Zeroing {
    /// Starts writing zeros at `from..to` of the log at `path`, which must be the
    /// file `live` is open on (a rewrite swaps files under the same name).
    pub(super) fn start(path: &Path, live: &File, from: u64, to: u64) -> std::io::Result<Zeroing> {
        let file = OpenOptions::new().write(true).open(path)?;
        let (ours, theirs) = (file.metadata()?, live.metadata()?);
        if (ours.dev(), ours.ino()) != (theirs.dev(), theirs.ino()) {
            return Err(std::io::Error::other(
                "the log's name no longer names the file being appended to",
            ));
        }
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress {
                reached: from,
                done: false,
            }),
            moved: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-zeros".into())
            .spawn(move || {
                let written = write_zeros(&file, from, to, &theirs);
                theirs.lock().done = true;
                theirs.moved.notify_all();
                written
            })?;
        Ok(Zeroing {
            thread: Some(thread),
            shared,
        })
    }

    /// How far the zeros reach now, and whether the thread is done.
    #[cfg(test)]
    pub(super) fn reached(&self) -> (u64, bool) {
        self.wait_for(0)
    }

    /// Waits until the zeros reach `end` or the thread is done, and returns how
    /// far they reach and whether the thread is done.
    pub(super) fn wait_for(&self, end: u64) -> (u64, bool) {
        let progress = self.shared.lock();
        let progress = self
            .shared
            .moved
            .wait_while(progress, |p| p.reached < end && !p.done)
            .unwrap_or_else(PoisonError::into_inner);
        (progress.reached, progress.done)
    }

    /// Waits for the thread: `Ok` when the whole run is written (or when it was
    /// waited for already).
    pub(super) fn join(&mut self) -> std::io::Result<()> {
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the log-zeros thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Zeroing {
    /// Stops the thread after the chunk it is writing, and waits for it: a run
    /// dropped unfinished (its file replaced or cut) never writes on.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.join();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped(&self) -> std::io::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("stopped"));
        }
        Ok(())
    }
}

fn write_zeros(file: &File, from: u64, to: u64, shared: &Shared) -> std::io::Result<()> {
    let zeros = vec![0u8; CHUNK];
    let mut at = from;
    while at < to {
        shared.stopped()?;
        let n = (to - at).min(CHUNK as u64);
        file.write_all_at(&zeros[..n as usize], at)?;
        // Records may go over these zeros now; the flush below only bounds
        // what the replica's next sync finds dirty.
        shared.lock().reached = at + n;
        shared.moved.notify_all();
        flush_range(file, at, n)?;
        at += n;
    }
    shared.stopped()?;
    // The blocks' allocation and the file's new size, committed here rather than
    // by the next append's sync.
    file.sync_data()
}

/// Writes `len` bytes at `at` to the disk and waits for them, leaving the rest of
/// the file's dirty pages (the replica's) alone.
fn flush_range(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    let offset = libc::off64_t::try_from(at).map_err(std::io::Error::other)?;
    let nbytes = libc::off64_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: sync_file_range takes a descriptor we hold open and plain integers,
    // and touches no memory of ours.
    let flushed = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset,
            nbytes,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    if flushed != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
