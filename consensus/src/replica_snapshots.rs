//! A replica's snapshots: when one is due, capturing the state and serialising it
//! on a thread of its own, storing it and compacting the log behind it, and
//! reading one back.

use std::collections::BTreeMap;
use std::time::Instant;

use raft::prelude::{ConfState, Snapshot};
use raft::Storage;

use super::{Replica, ReplicaError};
use crate::log_store::{SnapshotWrite, WriteBatch};
use crate::state_machine::{SnapshotError, SnapshotJob, StateMachine};

/// The log grows by at least this many times the last snapshot's size (and by the
/// configured bytes) before the next snapshot is taken.
const SNAPSHOT_AMORTIZE: u64 = 8;

/// A snapshot of the state as it was at `index`, being serialised.
pub(super) struct PendingSnapshot {
    index: u64,
    /// When it was captured, and how long the replica stopped to capture it.
    started: Instant,
    capture: std::time::Duration,
    term: u64,
    conf_state: ConfState,
    pub(super) work: SnapshotWork,
}

pub(super) enum SnapshotWork {
    /// Serialised on the replica's thread already.
    Done(Result<Vec<u8>, SnapshotError>),
    /// Being serialised on a thread of its own.
    Thread(std::thread::JoinHandle<Result<Vec<u8>, SnapshotError>>),
}

impl SnapshotWork {
    pub(super) fn is_done(&self) -> bool {
        match self {
            SnapshotWork::Done(_) => true,
            SnapshotWork::Thread(thread) => thread.is_finished(),
        }
    }

    fn wait(self) -> Result<Vec<u8>, SnapshotError> {
        match self {
            SnapshotWork::Done(result) => result,
            SnapshotWork::Thread(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(SnapshotError("the snapshot thread panicked".into()))),
        }
    }
}

/// Snapshot data: the members' addresses (length-prefixed JSON), then the state
/// machine's own bytes (what `job` makes).
pub(super) fn encode_state(
    job: SnapshotJob,
    members: &BTreeMap<u64, String>,
) -> Result<Vec<u8>, SnapshotError> {
    let members = serde_json::to_vec(members).map_err(|e| SnapshotError(e.to_string()))?;
    let state = job()?;
    let mut out = Vec::with_capacity(4 + members.len() + state.len());
    out.extend_from_slice(&(members.len() as u32).to_be_bytes());
    out.extend_from_slice(&members);
    out.extend_from_slice(&state);
    Ok(out)
}

impl<S: StateMachine> Replica<S> {
    /// Takes a snapshot when the log has grown enough since the last one, or when a
    /// peer needs one that the stored snapshot cannot serve (a server added since).
    pub(super) fn maybe_snapshot(&mut self) -> Result<(), ReplicaError> {
        if self.snapshotting.is_some() {
            return self.finish_snapshot();
        }
        let requested = self.raw.store().take_snapshot_request();
        let entries_since = self.applied.saturating_sub(self.snapshot_index);
        // A snapshot costs about its own size in serialisation and writes; letting
        // the log grow by a multiple of the last one before the next keeps that
        // cost a bounded share of the write work as the state grows.
        let bytes_due = self
            .config
            .snapshot_bytes
            .max(self.last_snapshot_len.saturating_mul(SNAPSHOT_AMORTIZE));
        let stagger = |due: u64| stagger_snapshot(due, self.config.id);
        if !requested
            && entries_since < stagger(self.config.snapshot_entries)
            && self.bytes_since_snapshot < stagger(bytes_due)
        {
            return Ok(());
        }
        if entries_since == 0 {
            return Ok(());
        }
        // Capturing copies the state; serialising it (a second or more for a large
        // state) runs apart, so this replica keeps answering its peers: a leader
        // that stopped for that long would lose its leadership to an election.
        let started = Instant::now();
        let job = self.state.read().capture();
        let capture = started.elapsed();
        let members = self.members.clone();
        let work = if self.config.snapshot_in_background {
            let thread =
                crate::background::spawn(format!("snapshot-{}", self.config.id), move || {
                    encode_state(job, &members)
                })
                .map_err(|e| SnapshotError(format!("cannot start the snapshot thread: {e}")))?;
            SnapshotWork::Thread(thread)
        } else {
            SnapshotWork::Done(encode_state(job, &members))
        };
        self.snapshotting = Some(PendingSnapshot {
            index: self.applied,
            started,
            capture,
            term: self.raw.store().term(self.applied)?,
            conf_state: self.conf_state.clone(),
            work,
        });
        self.bytes_since_snapshot = 0;
        self.finish_snapshot()
    }

    /// Once the pending snapshot is serialised, stores it and compacts the log behind
    /// it. One older than the stored snapshot (a leader's was installed meanwhile) is
    /// dropped.
    fn finish_snapshot(&mut self) -> Result<(), ReplicaError> {
        let Some(pending) = self.snapshotting.take_if(|pending| pending.work.is_done()) else {
            return Ok(());
        };
        let data = pending.work.wait()?;
        if pending.index <= self.snapshot_index {
            return Ok(());
        }
        self.last_snapshot_len = data.len() as u64;
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = pending.index;
        meta.term = pending.term;
        meta.set_conf_state(pending.conf_state);
        let keep_from = pending
            .index
            .saturating_sub(self.config.compact_keep)
            .max(1)
            + 1;
        let started = Instant::now();
        self.raw.mut_store().write(&WriteBatch {
            snapshot: Some(SnapshotWrite::Compact {
                snapshot: snap,
                keep_from,
            }),
            ..Default::default()
        })?;
        if let Some(m) = &self.metrics {
            m.log_write_seconds.observe(started.elapsed().as_secs_f64());
            m.snapshots_created.inc();
        }
        self.snapshot_index = pending.index;
        tracing::info!(
            index = pending.index,
            bytes = self.last_snapshot_len,
            capture_ms = pending.capture.as_millis() as u64,
            serialised_after_ms = (started - pending.started).as_millis() as u64,
            compact_ms = started.elapsed().as_millis() as u64,
            "snapshot stored"
        );
        Ok(())
    }
}

/// A replica's own point for a snapshot due at `due`: up to half as much again,
/// by server id. Replicas apply the same entries at the same pace, so with one
/// threshold they would all stop to write a snapshot at once, and a cluster of
/// three would pause its writes for as long as that takes; staggered, a quorum
/// keeps committing while one of them writes.
pub(super) fn stagger_snapshot(due: u64, id: u64) -> u64 {
    due.saturating_add(due / 8 * ((id.wrapping_sub(1)) % 5))
}

pub(super) fn restore_snapshot<S: StateMachine>(
    state: &mut S,
    snap: &Snapshot,
) -> Result<BTreeMap<u64, String>, SnapshotError> {
    let data: &[u8] = &snap.data;
    let bad = || SnapshotError("snapshot data is truncated".into());
    let len = u32::from_be_bytes(
        data.get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let end = 4 + len as usize;
    let members = serde_json::from_slice(data.get(4..end).ok_or_else(bad)?)
        .map_err(|e| SnapshotError(e.to_string()))?;
    state.restore(&data[end..])?;
    Ok(members)
}
