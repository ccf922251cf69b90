//! Compacting the log file off the replica's thread.
//!
//! A local snapshot lets the log drop the entries it covers, which means writing
//! the file anew: the snapshot (tens of MB for a large state) and the entries
//! kept. Done on the replica's thread, that stopped the server for 130-230 ms at
//! every snapshot of 100,000 jobs (2-core development machine), and a leader that
//! stops stops every write in the cluster. So a compaction starts the new file on
//! a background thread and returns: the live file stays whole and keeps taking
//! appends, and each record appended meanwhile is also kept here. Once the new
//! file is written and synced, the next append adds those records to it, syncs it,
//! and renames it over the live file (then syncs the directory); from then on the
//! log appends to the new file.
//!
//! A crash at any point leaves a whole log: before the rename the live file holds
//! every record (and opening the log removes the unfinished new file), after it
//! the new file does. Compaction is only ever the local
//! snapshot's: nothing Raft relies on waits for it, and an installed snapshot
//! (from the leader) or a failure drops the rewrite and is written as before.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::{encode_image, io_err, sync_dir, unfinished, write_synced, MAGIC};
use crate::log_store::{LogImage, LogStoreError};

/// The most bytes of records kept for a rewrite under way. Past it (the background
/// thread starved for a long while) the rewrite is dropped when it finishes, the
/// live file stays as it is, and the next snapshot compacts.
const KEPT_MAX: usize = 64 << 20;

/// A new log file being written by a background thread, and the records appended
/// to the live file since its image was taken.
pub(super) struct Rewrite {
    thread: JoinHandle<Result<(File, u64), LogStoreError>>,
    tmp: PathBuf,
    kept: Vec<u8>,
    overflowed: bool,
}

/// What finishing a rewrite did.
pub(super) enum Finished {
    /// The new file is the log now, `len` bytes of records long.
    Swapped { file: File, len: u64 },
    /// Nothing changed: the live file is still the log, whole.
    Dropped(String),
    /// The new file was renamed over the log but the directory did not sync: the
    /// log is the new file, and whether the rename survives a crash is unknown.
    Unsynced {
        file: File,
        len: u64,
        error: LogStoreError,
    },
}

impl Rewrite {
    /// Starts writing `image` as a new log file beside `path`.
    pub(super) fn start(path: &Path, image: LogImage) -> std::io::Result<Rewrite> {
        let tmp = unfinished(path);
        let at = tmp.clone();
        let thread = crate::background::spawn("log-rewrite".into(), move || {
            let mut bytes = MAGIC.to_vec();
            encode_image(&image, &mut bytes)?;
            drop(image);
            Ok((write_synced(&at, &bytes)?, bytes.len() as u64))
        })?;
        Ok(Rewrite {
            thread,
            tmp,
            kept: Vec::new(),
            overflowed: false,
        })
    }

    /// Keeps a record just appended to the live file, to follow the image.
    pub(super) fn keep(&mut self, record: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.kept.len() + record.len() > KEPT_MAX {
            self.overflowed = true;
            self.kept = Vec::new();
            return;
        }
        self.kept.extend_from_slice(record);
    }

    /// True once the background thread is done.
    pub(super) fn is_written(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the thread, then makes the new file the log at `path`: the
    /// records kept appended and synced, renamed over the log, the directory
    /// synced.
    pub(super) fn finish(self, path: &Path) -> Finished {
        let Rewrite {
            thread,
            tmp,
            kept,
            overflowed,
        } = self;
        let written = thread.join().unwrap_or_else(|_| {
            Err(LogStoreError::Database(
                "the log rewrite thread panicked".into(),
            ))
        });
        let dropped = |reason: String| {
            let _ = std::fs::remove_file(&tmp);
            Finished::Dropped(reason)
        };
        let (file, image_len) = match written {
            Ok(written) => written,
            Err(e) => return dropped(e.to_string()),
        };
        if overflowed {
            return dropped(format!(
                "more than {KEPT_MAX} bytes were appended while it was written"
            ));
        }
        let len = image_len + kept.len() as u64;
        if let Err(e) = file
            .write_all_at(&kept, image_len)
            .and_then(|()| file.sync_data())
            .and_then(|()| std::fs::rename(&tmp, path))
        {
            return dropped(io_err("finishing", &tmp, e).to_string());
        }
        match sync_dir(path) {
            Ok(()) => Finished::Swapped { file, len },
            Err(error) => Finished::Unsynced { file, len, error },
        }
    }

    /// Waits for the thread and removes what it wrote: the live file stays the log.
    pub(super) fn abandon(self) {
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.tmp);
    }
}
