//! Appending records with direct, synchronous writes (`O_DIRECT | O_DSYNC`).
//!
//! A record written through the page cache and then `fdatasync`ed costs the kernel
//! a writeback of the dirty pages (finding, locking and submitting them) before the
//! flush, and the caller a second system call. Written straight from memory with
//! `O_DIRECT | O_DSYNC`, the same record is one system call that returns once the
//! data and the device's cache flush are done. On the 2-core development machine
//! (a virtual disk without FUA, ext4 without a journal) a durable 4 KiB write took
//! 127 µs instead of 152 µs with a third less CPU in the kernel, and the three
//! servers of `benchmarks/control_plane/run.sh` on that one disk committed one
//! client's writes 7% faster on the leader (740 against 691 a second, three pairs
//! of fresh clusters alternated) and 9% faster on a follower (605 against 555),
//! where every write waits on a follower's sync while two others contend for the
//! disk; 16 and 64 clients, whose syncs carry many writes each, stayed within the
//! spread of fresh clusters.
//!
//! A direct write covers whole blocks from a block boundary: each append writes the
//! last, partly filled block again (its bytes before the record kept here in
//! memory), then the record, then zeros to the end of its last block. The bytes
//! before the record are written as they were, so a write the crash tears leaves
//! every earlier record whole: a sector holds either its old bytes or its new ones,
//! and the two agree there. What follows the record is zeros, as the log's end
//! reads ([`super`]). Memory and file offsets are aligned to [`BLOCK`], which is at
//! least the logical block size of the disks the log runs on.
//!
//! A file system that refuses direct I/O (tmpfs, some network file systems) opens
//! the log the buffered way, as does one that refuses a direct write as
//! misaligned: the log then writes and `fdatasync`s each record as before.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The alignment of a direct write's memory, offset and length.
pub(super) const BLOCK: usize = 4096;

/// A scratch buffer grown past this for one large record is given back after it.
const KEEP_SCRATCH: usize = 1 << 20;

/// The log file opened for direct, synchronous writes, and the bytes of its last
/// partly filled block.
pub(super) struct DirectAppender {
    file: File,
    /// The bytes between the last block boundary at or before the log's end and
    /// the end: an append writes them again in front of its record.
    tail: Vec<u8>,
    /// Where writes are assembled: a block-aligned window of it is written.
    scratch: Vec<u8>,
}

/// What an append through [`DirectAppender::append`] came to.
pub(super) enum Appended {
    /// The record is durable.
    Done,
    /// The file system refused the direct write as such (nothing was written): the
    /// record must go the buffered way, and so must every one after it.
    Refused(std::io::Error),
}

impl DirectAppender {
    /// Opens `path` for direct writes; `tail` is what the file holds from the last
    /// block boundary at or before the log's end up to the end. `None` when the file
    /// system refuses direct I/O.
    pub(super) fn open(path: &Path, tail: Vec<u8>) -> std::io::Result<Option<Self>> {
        debug_assert!(tail.len() < BLOCK);
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path);
        match opened {
            Ok(file) => Ok(Some(DirectAppender {
                file,
                tail,
                scratch: Vec::new(),
            })),
            Err(e) if e.kind() == ErrorKind::InvalidInput => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `record` at `at`, the log's end, and returns once it is durable.
    pub(super) fn append(&mut self, at: u64, record: &[u8]) -> std::io::Result<Appended> {
        let start = at - self.tail.len() as u64;
        debug_assert_eq!(start, block_start(at), "the tail is the last block's bytes");
        let filled = self.tail.len() + record.len();
        let padded = (block_end(at + record.len() as u64) - start) as usize;
        self.scratch.clear();
        self.scratch.resize(padded + BLOCK, 0);
        let skip = (BLOCK - self.scratch.as_ptr().addr() % BLOCK) % BLOCK;
        let window = &mut self.scratch[skip..skip + padded];
        window[..self.tail.len()].copy_from_slice(&self.tail);
        window[self.tail.len()..filled].copy_from_slice(record);
        let written = self.file.write_all_at(window, start);
        let appended = match written {
            Ok(()) => {
                let keep = filled % BLOCK;
                self.tail.clear();
                self.tail.extend_from_slice(&window[filled - keep..filled]);
                Appended::Done
            }
            // Misaligned for this file system: `write` checks alignment before it
            // writes anything.
            Err(e) if e.kind() == ErrorKind::InvalidInput => Appended::Refused(e),
            Err(e) => return Err(e),
        };
        if self.scratch.capacity() > KEEP_SCRATCH {
            self.scratch = Vec::new();
        }
        Ok(appended)
    }
}

/// The bytes of `log`, a whole log file held in memory, from its last block
/// boundary to its end.
pub(super) fn tail_of(log: &[u8]) -> Vec<u8> {
    log[block_start(log.len() as u64) as usize..].to_vec()
}

/// The bytes of the file at `path` from the last block boundary at or before `len`
/// up to `len`.
pub(super) fn read_tail(path: &Path, len: u64) -> std::io::Result<Vec<u8>> {
    let start = block_start(len);
    let mut tail = vec![0; (len - start) as usize];
    File::open(path)?.read_exact_at(&mut tail, start)?;
    Ok(tail)
}

/// The last block boundary at or before `offset`.
pub(super) fn block_start(offset: u64) -> u64 {
    offset - offset % BLOCK as u64
}

/// The first block boundary at or after `offset`: a direct write of a record
/// ending at `offset` writes the file up to there, zeros after the record.
pub(super) fn block_end(offset: u64) -> u64 {
    offset.div_ceil(BLOCK as u64) * BLOCK as u64
}
