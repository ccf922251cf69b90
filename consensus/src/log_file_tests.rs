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

/// The batch of a local snapshot at `snapshot` keeping entries from `keep_from`.
fn compaction(snapshot: Snapshot, keep_from: u64) -> WriteBatch {
    WriteBatch {
        snapshot: Some(SnapshotWrite::Compact {
            snapshot,
            keep_from,
        }),
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
    write(&mut log, &mut image, compaction(snap, 4));
    log.settle(true).unwrap();
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

/// The log as `log` would reopen it now.
fn reopened(log: &FileLog, path: &Path) -> LogImage {
    let image = log.load().unwrap();
    let bytes = std::fs::read(path).unwrap();
    same(&replay(&bytes).unwrap().0, &image);
    image
}

/// A compaction returns before its new file is written; what is appended
/// meanwhile goes to the live file and follows the image into the new one, and
/// the log reads the same at every step.
#[test]
fn appends_go_on_while_a_compaction_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.log");
    let (mut log, mut image) = started(&path);
    for i in 7..=400 {
        write(&mut log, &mut image, batch(vec![entry(i, 1, 500)]));
    }
    let before = image.clone();
    let mut snap = image.snapshot().clone();
    snap.mut_metadata().index = 390;
    let compact = compaction(snap, 380);
    write(&mut log, &mut image, compact);
    assert!(log.rewrite.is_some(), "the rewrite runs in the background");
    // Until it is swapped in, the live file holds the log as it was, whole.
    same(&reopened(&log, &path), &before);
    let mut appended = before.clone();
    let mut i = 401;
    while log.rewrite.is_some() && i < 5_000 {
        let b = batch(vec![entry(i, 1, 500)]);
        appended.apply(&b);
        write(&mut log, &mut image, b);
        let now = std::fs::read(&path).unwrap();
        let on_disk = replay(&now).unwrap().0;
        if log.rewrite.is_some() {
            same(&on_disk, &appended);
        } else {
            same(&on_disk, &image);
        }
        i += 1;
    }
    assert!(
        log.rewrite.is_none(),
        "swapped in after {} appends",
        i - 401
    );
    assert!(!path.with_extension("rewrite").exists());
    write(&mut log, &mut image, batch(vec![entry(i, 1, 500)]));
    drop(log);
    let loaded = FileLog::open(&path).unwrap().load().unwrap();
    same(&loaded, &image);
    assert_eq!(loaded.entries().front().unwrap().index, 380);
    assert_eq!(loaded.snapshot().get_metadata().index, 390);
}

/// A server that crashes while a compaction is written reopens its log as the
/// live file had it: every record, the older snapshot. One that closes its log
/// then finds it compacted.
#[test]
fn a_compaction_cut_short_leaves_the_log_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.log");
    let (mut log, mut image) = started(&path);
    let mut snap = image.snapshot().clone();
    snap.mut_metadata().index = 5;
    let before = image.clone();
    let compact = compaction(snap.clone(), 5);
    write(&mut log, &mut image, compact);
    assert!(log.rewrite.is_some());
    let crashed = dir.path().join("crashed.log");
    std::fs::copy(&path, &crashed).unwrap();
    let unfinished = crashed.with_extension("rewrite");
    std::fs::write(&unfinished, &MAGIC[..5]).unwrap();
    drop(log);
    same(&FileLog::open(&crashed).unwrap().load().unwrap(), &before);
    assert!(
        !unfinished.exists(),
        "an unfinished rewrite is removed on open"
    );
    assert!(!path.with_extension("rewrite").exists());
    same(&FileLog::open(&path).unwrap().load().unwrap(), &image);
    // A snapshot installed from the leader while a compaction is written replaces
    // it, and is on disk when the write returns.
    let (mut log, mut image) = started(&dir.path().join("second.log"));
    write(&mut log, &mut image, compaction(snap.clone(), 5));
    snap.mut_metadata().index = 9;
    snap.mut_metadata().term = 3;
    write(
        &mut log,
        &mut image,
        WriteBatch {
            snapshot: Some(SnapshotWrite::Install(snap)),
            ..Default::default()
        },
    );
    assert!(log.rewrite.is_none());
    same(&reopened(&log, &dir.path().join("second.log")), &image);
    assert_eq!(image.snapshot().get_metadata().index, 9);
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
        // The run of zeros started behind this record, written.
        log.collect_zeros(u64::MAX);
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

/// The zeros are written by another thread while records are appended; a
/// record that reaches the run being written waits for it, so no record is
/// overwritten by zeros, whatever its size against the run's.
#[test]
fn records_larger_than_the_zeros_ahead_are_never_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.log");
    let (mut log, mut image) = started(&path);
    let mut started_runs = 0;
    for i in 7..=120 {
        // From a few bytes to past the first runs' length, out of step with them.
        let size = (i as usize * 7919) % (300 << 10) + 10;
        write(&mut log, &mut image, batch(vec![entry(i, 1, size)]));
        if let Some(zeroing) = &log.zeroing {
            assert!(
                zeroing.reached().0 >= log.len,
                "zeros go on after the records"
            );
            started_runs += 1;
        }
        assert!(log.allocated >= log.len);
    }
    assert!(
        started_runs > 0,
        "runs of zeros were written in the background"
    );
    same(&reopened(&log, &path), &image);
    drop(log);
    let log = FileLog::open(&path).unwrap();
    same(&log.load().unwrap(), &image);
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes[log.len as usize..].iter().all(|b| *b == 0));
}

/// A run of zeros under way when the file is replaced (a compaction swapped in,
/// a snapshot installed) is stopped: it never writes into the new file.
#[test]
fn replacing_the_file_stops_the_zeros_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.log");
    let (mut log, mut image) = started(&path);
    log.collect_zeros(u64::MAX);
    // The first record past the zeros starts a run of them right behind it.
    let mut i = 7;
    while log.zeroing.is_none() {
        write(&mut log, &mut image, batch(vec![entry(i, 1, 4000)]));
        i += 1;
    }
    let mut snap = image.snapshot().clone();
    snap.mut_metadata().index = i - 2;
    write(&mut log, &mut image, compaction(snap, i - 3));
    log.settle(true).unwrap();
    assert!(log.zeroing.is_none());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), log.len);
    while log.zeroing.is_none() {
        write(&mut log, &mut image, batch(vec![entry(i, 1, 4000)]));
        i += 1;
    }
    let mut installed = image.snapshot().clone();
    installed.mut_metadata().index = i + 10;
    installed.mut_metadata().term = 2;
    let install = WriteBatch {
        snapshot: Some(SnapshotWrite::Install(installed)),
        ..Default::default()
    };
    write(&mut log, &mut image, install);
    assert!(log.zeroing.is_none());
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), log.len);
    write(&mut log, &mut image, batch(vec![entry(i + 11, 2, 100)]));
    drop(log);
    same(&FileLog::open(&path).unwrap().load().unwrap(), &image);
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

/// Whether the file system under `dir` takes a file opened for direct I/O.
fn takes_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("probe");
    let opened = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    opened.is_ok()
}

/// Appends 40 records of sizes that fall across block boundaries in every
/// way (a few bytes, about a block, several blocks), checking the file after each:
/// the records' bytes as replayed, zeros after them.
fn append_across_blocks(log: &mut FileLog, image: &mut LogImage, path: &Path, from: u64) -> u64 {
    let mut i = from;
    for n in 0..40 {
        let size = (n * 1733) % 13_000 + 1;
        write(log, image, batch(vec![entry(i, 2, size)]));
        i += 1;
        let bytes = std::fs::read(path).unwrap();
        assert!(bytes.len() as u64 >= log.len);
        same(&replay(&bytes[..log.len as usize]).unwrap().0, image);
        assert!(
            bytes[log.len as usize..].iter().all(|b| *b == 0),
            "zeros after the records"
        );
    }
    i
}

/// Where the file system takes direct I/O, records go to the file with direct
/// writes of whole blocks: each rewrites the last block's earlier bytes as they
/// were, so every record before it reads back whole, across reopening, a
/// snapshot rewriting the file and a compaction swapped in.
#[test]
fn direct_writes_keep_every_record_whole_across_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.log");
    let (mut log, mut image) = started(&path);
    assert_eq!(log.direct.is_some(), takes_direct_io(dir.path()));
    let i = append_across_blocks(&mut log, &mut image, &path, 7);
    // Reopened: the last block's bytes are read back from the file.
    drop(log);
    let mut log = FileLog::open(&path).unwrap();
    same(&log.load().unwrap(), &image);
    assert_eq!(log.direct.is_some(), takes_direct_io(dir.path()));
    let i = append_across_blocks(&mut log, &mut image, &path, i);
    // A snapshot installed rewrites the file: the last block's bytes come from
    // the record written.
    let mut snap = image.snapshot().clone();
    snap.mut_metadata().index = i + 10;
    snap.mut_metadata().term = 3;
    let install = WriteBatch {
        snapshot: Some(SnapshotWrite::Install(snap.clone())),
        ..Default::default()
    };
    write(&mut log, &mut image, install);
    let mut i = append_across_blocks(&mut log, &mut image, &path, i + 11);
    // A compaction written in the background and swapped in: the last block's
    // bytes are read from the new file.
    let mut snap = image.snapshot().clone();
    snap.mut_metadata().index = i - 5;
    write(&mut log, &mut image, compaction(snap, i - 8));
    while log.rewrite.is_some() {
        write(&mut log, &mut image, batch(vec![entry(i, 3, 900)]));
        i += 1;
    }
    append_across_blocks(&mut log, &mut image, &path, i);
    assert_eq!(log.direct.is_some(), takes_direct_io(dir.path()));
    drop(log);
    same(&FileLog::open(&path).unwrap().load().unwrap(), &image);
}

/// Where the file system refuses direct I/O (or a direct write), the log is the
/// same, written and synced through the page cache; a log written one way reads
/// back and goes on the other.
#[test]
fn without_direct_writes_the_log_is_written_through_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.log");
    let (mut log, mut image) = started(&path);
    log.direct = None;
    let i = append_across_blocks(&mut log, &mut image, &path, 7);
    drop(log);
    let mut log = FileLog::open(&path).unwrap();
    same(&log.load().unwrap(), &image);
    let i = append_across_blocks(&mut log, &mut image, &path, i);
    drop(log);
    let mut log = FileLog::open(&path).unwrap();
    log.direct = None;
    append_across_blocks(&mut log, &mut image, &path, i);
    drop(log);
    same(&FileLog::open(&path).unwrap().load().unwrap(), &image);
}
