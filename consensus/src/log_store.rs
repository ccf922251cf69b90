//! The Raft log store: entries, hard state and the latest snapshot, kept in memory for
//! raft-rs's reads and written through to a [`Durable`] medium before anything that
//! depends on it is acknowledged or sent.
//!
//! Every change reaches the medium as one [`WriteBatch`], and one batch is one fsync:
//! the driver gathers the entries, hard state and snapshot of a whole `Ready` into a
//! single batch.
//!
//! The servers' medium is [`FileLog`](crate::log_file::FileLog), an append-only file
//! of checksummed records. [`RedbDisk`], the redb database the servers used before,
//! stays to carry an existing log over (and as a second medium for the same tests).
//! redb did the same job with crash-safe transactions and no recovery code of ours,
//! but it paid B-tree page writes, allocator bookkeeping and zeroed page buffers on
//! every commit: measured with `cargo run --release -p aigrid-consensus --example
//! log_write` (500 batches of 600-byte entries, mean per batch, on the 2-core
//! development machine), 155 µs of CPU and 0.37 ms for one entry and 691 µs and
//! 1.36 ms for 64, against 52 µs / 0.20 ms and 210 µs / 0.58 ms for the file log,
//! which is within a few µs of a bare append plus `sync_data` (50 µs / 0.18 ms and
//! 145 µs / 0.52 ms). On a busy server that CPU is taken from request handling:
//! the switch alone took the control-plane benchmark (16 clients, TLS, signed) from
//! about 1,100 to about 1,450 job submissions a second.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// A failure of the durable medium. The driver stops on it: a replica whose log cannot
/// be written must not vote or acknowledge anything.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// The underlying database failed.
    #[error("log database: {0}")]
    Database(String),
    /// Bytes on disk did not decode.
    #[error("corrupt log record: {0}")]
    Corrupt(String),
    /// The simulated medium was told to fail this write (a crash before fsync).
    #[error("simulated crash before the write reached the disk")]
    SimulatedCrash,
}

/// How a snapshot enters the store.
#[derive(Debug, Clone)]
pub enum SnapshotWrite {
    /// A snapshot received from the leader: it replaces the whole log.
    Install(Snapshot),
    /// A snapshot of the local state: entries before `keep_from` are dropped, later ones
    /// stay so slightly lagging followers can still be served from the log.
    Compact {
        /// The new latest snapshot.
        snapshot: Snapshot,
        /// The first log index to keep.
        keep_from: u64,
    },
}

/// Everything one `Ready` asks to persist; written with a single fsync.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    /// A snapshot to install or to compact behind.
    pub snapshot: Option<SnapshotWrite>,
    /// New entries; any stored entries at or after the first of them are replaced.
    pub entries: Vec<Entry>,
    /// The new hard state.
    pub hard_state: Option<HardState>,
}

impl WriteBatch {
    /// True when the batch would write nothing.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard_state.is_none()
    }
}

/// The log as raft-rs reads it: the latest snapshot, the entries after it, the hard state.
///
/// The conf state is the snapshot's: the driver replays committed entries after the
/// snapshot on start, so the configuration it rebuilds always matches the applied index.
#[derive(Debug, Clone, Default)]
pub struct LogImage {
    hard_state: HardState,
    snapshot: Snapshot,
    entries: VecDeque<Entry>,
}

impl LogImage {
    /// An image holding only `snapshot`, the starting point of a bootstrapped log.
    pub fn from_snapshot(snapshot: Snapshot) -> Self {
        let mut image = LogImage::default();
        image.apply(&WriteBatch {
            snapshot: Some(SnapshotWrite::Install(snapshot)),
            ..Default::default()
        });
        image
    }

    /// True when the image was never initialised with a configuration.
    pub fn is_blank(&self) -> bool {
        self.snapshot.get_metadata().index == 0 && self.entries.is_empty()
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first_index(&self) -> u64 {
        self.entries
            .front()
            .map_or(self.snapshot_index() + 1, |e| e.index)
    }

    fn last_index(&self) -> u64 {
        self.entries
            .back()
            .map_or(self.snapshot_index(), |e| e.index)
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The entries kept, oldest first (they may start before the snapshot's index:
    /// a compaction keeps some for lagging followers).
    pub fn entries(&self) -> &VecDeque<Entry> {
        &self.entries
    }

    /// Where the entries from index `index` on start in `entries`.
    fn position(&self, index: u64) -> usize {
        self.entries.partition_point(|e| e.index < index)
    }

    /// Takes out the entries before index `keep_from`, oldest first.
    fn split_before(&mut self, keep_from: u64) -> VecDeque<Entry> {
        let kept = self.entries.split_off(self.position(keep_from));
        std::mem::replace(&mut self.entries, kept)
    }

    /// A copy holding only the entries from index `keep_from` on.
    pub fn kept_from(&self, keep_from: u64) -> LogImage {
        let first = self.position(keep_from);
        LogImage {
            hard_state: self.hard_state.clone(),
            snapshot: self.snapshot.clone(),
            entries: self.entries.range(first..).cloned().collect(),
        }
    }

    /// Applies a batch; the same function updates memory and the simulated disk, so the
    /// two cannot disagree on what a batch means.
    pub fn apply(&mut self, batch: &WriteBatch) {
        match &batch.snapshot {
            Some(SnapshotWrite::Install(snap)) => {
                let meta = snap.get_metadata();
                self.entries.clear();
                self.hard_state.term = self.hard_state.term.max(meta.term);
                self.hard_state.commit = self.hard_state.commit.max(meta.index);
                self.snapshot = snap.clone();
            }
            Some(SnapshotWrite::Compact {
                snapshot,
                keep_from,
            }) => {
                while self.entries.front().is_some_and(|e| e.index < *keep_from) {
                    self.entries.pop_front();
                }
                self.snapshot = snapshot.clone();
                // A local snapshot covers applied, hence committed, entries.
                let meta = snapshot.get_metadata();
                self.hard_state.commit = self.hard_state.commit.max(meta.index);
                // Entries at or before the snapshot that are not contiguous with it are
                // useless; keep the log starting right after what the snapshot covers.
                if self
                    .entries
                    .front()
                    .is_some_and(|e| e.index > snapshot.get_metadata().index + 1)
                {
                    self.entries.clear();
                }
            }
            None => {}
        }
        if let Some(first) = batch.entries.first() {
            while self.entries.back().is_some_and(|e| e.index >= first.index) {
                self.entries.pop_back();
            }
            debug_assert!(
                self.last_index() + 1 >= first.index,
                "gap in log: last {} new {}",
                self.last_index(),
                first.index
            );
            self.entries.extend(batch.entries.iter().cloned());
        }
        if let Some(hs) = &batch.hard_state {
            self.hard_state = hs.clone();
        }
    }

    fn entry(&self, index: u64) -> Option<&Entry> {
        let first = self.entries.front()?.index;
        if index < first {
            return None;
        }
        self.entries.get((index - first) as usize)
    }
}

/// A medium that keeps [`WriteBatch`]es across crashes.
pub trait Durable: Send + 'static {
    /// Reads back everything written so far.
    fn load(&self) -> Result<LogImage, LogStoreError>;
    /// Writes one batch and returns once it is on stable storage (one fsync).
    /// `before` is the log as it stands without the batch (a medium may rewrite
    /// itself from it when a snapshot lets the log drop its head).
    fn write(&mut self, batch: &WriteBatch, before: &LogImage) -> Result<(), LogStoreError>;
}

/// Compacted entries beyond this many are freed on a thread of their own.
const FREE_APART: usize = 1_000;

/// The in-memory log in front of a durable medium; implements raft-rs's [`Storage`].
pub struct LogStore {
    image: LogImage,
    disk: Box<dyn Durable>,
    /// Set when raft asked for a snapshot the stored one cannot serve (it predates the
    /// configuration that added the peer): the replica takes a fresh one.
    snapshot_wanted: AtomicBool,
}

impl LogStore {
    /// Opens the store, reading back what the medium holds.
    pub fn open(disk: Box<dyn Durable>) -> Result<Self, LogStoreError> {
        let image = disk.load()?;
        Ok(LogStore {
            image,
            disk,
            snapshot_wanted: AtomicBool::new(false),
        })
    }

    /// True when a peer needs a snapshot newer than the stored one.
    pub fn snapshot_requested(&self) -> bool {
        self.snapshot_wanted.load(Ordering::Relaxed)
    }

    /// Clears and answers the request for a fresh snapshot.
    pub fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    /// Writes a batch durably, then makes it visible to raft-rs.
    pub fn write(&mut self, batch: &WriteBatch) -> Result<(), LogStoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.disk.write(batch, &self.image)?;
        if let Some(SnapshotWrite::Compact { keep_from, .. }) = &batch.snapshot {
            // A compaction drops about as many entries as a snapshot is apart
            // (100,000 by default); freeing their buffers took the replica's thread
            // 15-40 ms on a busy server, so they are freed on a thread of their own.
            let dropped = self.image.split_before(*keep_from);
            if dropped.len() > FREE_APART {
                let freed = crate::background::spawn("log-free".into(), move || drop(dropped));
                if let Err(e) = freed {
                    tracing::debug!(error = %e, "freeing compacted entries in place");
                }
            }
        }
        self.image.apply(batch);
        Ok(())
    }

    /// Records a newer commit index in memory; it reaches the disk with the next batch.
    /// A lower commit index on disk after a crash is safe: raft learns it again.
    pub fn set_commit(&mut self, commit: u64) {
        self.image.hard_state.commit = self.image.hard_state.commit.max(commit);
    }

    /// The in-memory view of the log.
    pub fn image(&self) -> &LogImage {
        &self.image
    }

    /// Total size in bytes of the entries currently kept.
    pub fn entries_len(&self) -> usize {
        self.image.entries.len()
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.image.hard_state.clone(),
            self.image.snapshot.get_metadata().get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.image.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.image.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for index in low..high {
            let entry = self
                .image
                .entry(index)
                .ok_or(raft::Error::Store(StorageError::Unavailable))?;
            size += u64::from(entry.compute_size());
            if !out.is_empty() && size > max {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.image.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.image.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.image
            .entry(idx)
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.image.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.image.last_index())
    }

    /// The stored snapshot, when it can serve peer `to`: it must include `to` in its
    /// configuration (a peer refuses a snapshot that leaves it out, so a server added
    /// after the last snapshot would never catch up) and cover `request_index`.
    /// Otherwise a fresh snapshot is requested from the replica and raft is told to
    /// try again later.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let meta = self.image.snapshot.get_metadata();
        let cs = meta.get_conf_state();
        let includes = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .chain(&cs.learners_next)
            .any(|id| *id == to);
        if meta.index < request_index || !includes {
            self.snapshot_wanted.store(true, Ordering::Relaxed);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.image.snapshot.clone())
    }
}

/// The first snapshot of a new cluster: index 1, term 1, the initial voters.
///
/// Starting the log at index 1 means a server that joins later, with an empty log,
/// always catches up from a snapshot rather than from an empty configuration.
pub fn bootstrap_snapshot(voters: Vec<u64>, data: Vec<u8>) -> Snapshot {
    let mut meta = SnapshotMetadata {
        index: 1,
        term: 1,
        ..Default::default()
    };
    meta.set_conf_state(ConfState::from((voters, vec![])));
    let mut snap = Snapshot::default();
    snap.set_metadata(meta);
    snap.data = data.into();
    snap
}

const ENTRIES: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("entries");
const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
const HARD_STATE: &str = "hard_state";
const SNAPSHOT: &str = "snapshot";

fn db_err(e: impl std::fmt::Display) -> LogStoreError {
    LogStoreError::Database(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> LogStoreError {
    LogStoreError::Corrupt(e.to_string())
}

/// The on-disk medium: one redb file; each batch is one durable transaction.
pub struct RedbDisk {
    db: redb::Database,
}

impl RedbDisk {
    /// Opens or creates the log database at `path`.
    pub fn open(path: &Path) -> Result<Self, LogStoreError> {
        let db = redb::Database::create(path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(ENTRIES).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(RedbDisk { db })
    }
}

impl Durable for RedbDisk {
    fn load(&self) -> Result<LogImage, LogStoreError> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let mut image = LogImage::default();
        if let Some(bytes) = meta.get(SNAPSHOT).map_err(db_err)? {
            image.snapshot = Snapshot::parse_from_bytes(bytes.value()).map_err(corrupt)?;
        }
        if let Some(bytes) = meta.get(HARD_STATE).map_err(db_err)? {
            image.hard_state = HardState::parse_from_bytes(bytes.value()).map_err(corrupt)?;
        }
        // An installed snapshot implies its index is committed, as `LogImage::apply`
        // records in memory; the stored hard state may predate the install.
        let meta = image.snapshot.get_metadata();
        image.hard_state.term = image.hard_state.term.max(meta.term);
        image.hard_state.commit = image.hard_state.commit.max(meta.index);
        let entries = txn.open_table(ENTRIES).map_err(db_err)?;
        for row in entries.range::<u64>(..).map_err(db_err)? {
            let (_, value) = row.map_err(db_err)?;
            let entry = Entry::parse_from_bytes(value.value()).map_err(corrupt)?;
            if let Some(last) = image.entries.back() {
                if entry.index != last.index + 1 {
                    return Err(corrupt(format!(
                        "log gap after index {}: found {}",
                        last.index, entry.index
                    )));
                }
            }
            image.entries.push_back(entry);
        }
        Ok(image)
    }

    fn write(&mut self, batch: &WriteBatch, _before: &LogImage) -> Result<(), LogStoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            match &batch.snapshot {
                Some(SnapshotWrite::Install(snap)) => {
                    entries.retain(|_, _| false).map_err(db_err)?;
                    let bytes = snap.write_to_bytes().map_err(corrupt)?;
                    meta.insert(SNAPSHOT, bytes.as_slice()).map_err(db_err)?;
                }
                Some(SnapshotWrite::Compact {
                    snapshot,
                    keep_from,
                }) => {
                    entries
                        .retain_in(..*keep_from, |_, _| false)
                        .map_err(db_err)?;
                    let bytes = snapshot.write_to_bytes().map_err(corrupt)?;
                    meta.insert(SNAPSHOT, bytes.as_slice()).map_err(db_err)?;
                }
                None => {}
            }
            if let Some(first) = batch.entries.first() {
                entries
                    .retain_in(first.index.., |_, _| false)
                    .map_err(db_err)?;
                for entry in &batch.entries {
                    let bytes = entry.write_to_bytes().map_err(corrupt)?;
                    entries
                        .insert(entry.index, bytes.as_slice())
                        .map_err(db_err)?;
                }
            }
            if let Some(hs) = &batch.hard_state {
                let bytes = hs.write_to_bytes().map_err(corrupt)?;
                meta.insert(HARD_STATE, bytes.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::SimDisk;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn batch(entries: Vec<Entry>) -> WriteBatch {
        WriteBatch {
            entries,
            ..Default::default()
        }
    }

    fn store_on(disk: Box<dyn Durable>) -> LogStore {
        let mut store = LogStore::open(disk).unwrap();
        if store.image().is_blank() {
            store
                .write(&WriteBatch {
                    snapshot: Some(SnapshotWrite::Install(bootstrap_snapshot(
                        vec![1, 2, 3],
                        b"s".to_vec(),
                    ))),
                    ..Default::default()
                })
                .unwrap();
        }
        store
    }

    /// Writes through one handle, then reopens (after dropping it) and checks what the
    /// medium kept.
    fn exercise(open: impl Fn() -> Box<dyn Durable>) {
        let mut store = store_on(open());
        assert_eq!(store.first_index().unwrap(), 2);
        assert_eq!(store.last_index().unwrap(), 1);
        assert_eq!(store.term(1).unwrap(), 1);
        store
            .write(&batch((2..=6).map(|i| entry(i, 1)).collect()))
            .unwrap();
        // A conflicting suffix from a new leader replaces entries 5 and 6.
        store.write(&batch(vec![entry(5, 2)])).unwrap();
        assert_eq!(store.last_index().unwrap(), 5);
        assert_eq!(store.term(5).unwrap(), 2);
        let hs = HardState {
            term: 2,
            vote: 3,
            commit: 4,
            ..Default::default()
        };
        store
            .write(&WriteBatch {
                hard_state: Some(hs.clone()),
                ..Default::default()
            })
            .unwrap();
        let mut snap = store.image().snapshot().clone();
        snap.mut_metadata().index = 4;
        snap.mut_metadata().term = 1;
        store
            .write(&WriteBatch {
                snapshot: Some(SnapshotWrite::Compact {
                    snapshot: snap,
                    keep_from: 3,
                }),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(store.first_index().unwrap(), 3);
        assert!(matches!(
            store.entries(2, 4, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let got = store
            .entries(3, 6, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(3, 1), (4, 1), (5, 2)]
        );

        drop(store);
        let reopened = LogStore::open(open()).unwrap();
        let state = reopened.initial_state().unwrap();
        assert_eq!(state.hard_state, hs);
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(reopened.first_index().unwrap(), 3);
        assert_eq!(reopened.last_index().unwrap(), 5);
        assert_eq!(reopened.term(4).unwrap(), 1);
        assert_eq!(reopened.image().snapshot().data.as_ref(), b"s");

        // Installing a leader's snapshot drops the whole log.
        let mut store = reopened;
        let mut snap = bootstrap_snapshot(vec![1, 2, 3, 4], b"t".to_vec());
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 3;
        store
            .write(&WriteBatch {
                snapshot: Some(SnapshotWrite::Install(snap)),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(store.first_index().unwrap(), 11);
        assert_eq!(store.last_index().unwrap(), 10);
        drop(store);
        let again = LogStore::open(open()).unwrap();
        assert_eq!(again.first_index().unwrap(), 11);
        assert_eq!(again.initial_state().unwrap().hard_state.commit, 10);
        assert_eq!(
            again.initial_state().unwrap().conf_state.voters,
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn redb_log_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        exercise(|| Box::new(RedbDisk::open(&path).unwrap()));
    }

    #[test]
    fn file_log_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        exercise(|| Box::new(crate::log_file::FileLog::open(&path).unwrap()));
    }

    #[test]
    fn sim_disk_matches_and_fails_on_demand() {
        let disk = SimDisk::default();
        exercise(|| Box::new(disk.clone()));
        let mut store = LogStore::open(Box::new(disk.clone())).unwrap();
        let before = store.last_index().unwrap();
        disk.fail_next_write();
        assert!(store.write(&batch(vec![entry(before + 1, 3)])).is_err());
        assert_eq!(store.last_index().unwrap(), before);
        let reopened = LogStore::open(Box::new(disk)).unwrap();
        assert_eq!(reopened.last_index().unwrap(), before);
    }
}
